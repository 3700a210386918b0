"""JSON bodies of the long read answers, written from row tuples.

A trend of 500 checkpoints is 500 points of 13 fields. Built as a dict per point (0.6 ms of
CPU), then validated by its response model and dumped (0.8 ms), its body cost more than its
query; under 32 concurrent clients on two cores every such millisecond is paid again by each
request queued behind it. Here the points stay the tuples the queries make, in the field order
of their model, and the body is written from them (0.4 ms): every number of an answer in one
``pydantic_core.to_json`` call (the serialiser the response models use, so the same bytes:
``1e-5`` as ``0.00001``, NaN and infinities as ``null``), the keys put between them.

What makes that the model's answer and not merely JSON: the head (every field but the list of
points) is validated and dumped by the model itself; a point's fields are written in the
model's order; the caller hands each field the Python type the model declares (a float field a
float, never an int: the model would write ``3.0``); fields that are not numbers (a status,
the exclusions) go through :class:`PointsBody`'s converters. ``tests/service/test_bodies.py``
compares these bodies with the validated path's, byte for byte, on real answers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic_core import from_json, to_json

from alphawatch.service.api.schemas import BlockTrend, HistoryPoint, TrendPoint

# Text fields repeat (a few statuses, a few exclusion sets): their JSON is kept, up to a bound.
_MEMO_LIMIT = 4096


class Memo:
    """The JSON of values that repeat, written once and kept (up to a bound) for the next row."""

    def __init__(self, encode: Callable[[Any], bytes]):
        self._encode = encode
        self._kept: dict[Any, bytes] = {}

    def column(self, values: Sequence[Any]) -> list[bytes]:
        """The JSON of each value."""
        kept = self._kept
        try:
            return [kept[value] for value in values]  # every one seen before: the usual case
        except (KeyError, TypeError):
            return [self._one(value) for value in values]

    def _one(self, value: Any) -> bytes:
        try:
            found = self._kept.get(value)
        except TypeError:  # unhashable (a dict): written each time
            return self._encode(value)
        if found is None:
            found = self._encode(value)
            if len(self._kept) >= _MEMO_LIMIT:
                self._kept.clear()
            self._kept[value] = found
        return found


def counts_json(value: str | Mapping[str, int]) -> bytes:
    """A ``dict[str, int]`` field: from the JSON text a table keeps (``{"a": 1}``, with spaces
    or without) or from a dict (whose counts may be numpy integers)."""
    if isinstance(value, str):
        return to_json(from_json(value))
    return to_json({str(k): int(v) for k, v in value.items()})


class PointsBody:
    """Writes a list of ``model`` points from tuples in the model's field order.

    Fields named in ``convert`` are written by their converter (the JSON of each value of the
    field's column); the others must be numbers, booleans or None, of the types the model
    declares.
    """

    def __init__(
        self, model: type[BaseModel], convert: Mapping[str, Callable[[Sequence[Any]], list[bytes]]]
    ):
        names = list(model.model_fields)
        unknown = set(convert) - set(names)
        if unknown:
            raise ValueError(f"{model.__name__} has no field {sorted(unknown)}")
        self.fields = tuple(names)
        self._width = len(names)
        # The text before each field's value; the first closes the point before.
        self._keys = [b'},{"' + names[0].encode() + b'":'] + [
            b',"' + name.encode() + b'":' for name in names[1:]
        ]
        self._converted = tuple(
            (i, convert[name]) for i, name in enumerate(names) if name in convert
        )

    def points(self, rows: Sequence[Sequence[Any]]) -> bytes:
        """``[point,...]`` of the rows, in their order."""
        if not rows:
            return b"[]"
        width = self._width
        # Every value in one list; the converted ones set aside, zeros in their place, so that
        # one serialiser call writes all the numbers and a comma parts them (a number's JSON
        # never holds one).
        flat = list(chain.from_iterable(rows))
        if len(flat) != width * len(rows):
            raise ValueError(f"rows of {width} fields expected")
        aside = [(i, encode, flat[i::width]) for i, encode in self._converted]
        for i, _, _ in aside:
            flat[i::width] = bytes(len(rows))
        parts = to_json(flat, inf_nan_mode="null")[1:-1].split(b",")
        for i, encode, values in aside:
            parts[i::width] = encode(values)
        out = [b""] * (2 * len(parts))
        out[0::2] = self._keys * len(rows)
        out[1::2] = parts
        out[0] = out[0][2:]  # no point before the first
        return b"[" + b"".join(out) + b"}]"


_ADAPTERS: dict[type[BaseModel], TypeAdapter[Any]] = {}


def with_list(model: type[BaseModel], head: dict[str, Any], field: str, items: bytes) -> bytes:
    """The body of ``model`` whose last field, ``field``, is the JSON list ``items``: the head
    validated and dumped by the model (with an empty list), the list spliced in."""
    if next(reversed(model.model_fields)) != field:
        raise ValueError(f"{field} is not the last field of {model.__name__}")
    adapter = _ADAPTERS.get(model) or _ADAPTERS.setdefault(model, TypeAdapter(model))
    empty = adapter.dump_json(adapter.validate_python({**head, field: []}))
    assert empty.endswith(b"[]}")
    return empty[:-3] + items + b"}"


TREND_POINTS = PointsBody(TrendPoint, {"excluded": Memo(counts_json).column})
HISTORY_POINTS = PointsBody(HistoryPoint, {"fit_status": Memo(to_json).column})
_BLOCK_KEYS = tuple(BlockTrend.model_fields)


def block_trends(blocks: Sequence[tuple[int, Sequence[Sequence[Any]]]]) -> bytes:
    """``[BlockTrend,...]`` of (block, its trend's points as TrendPoint rows)."""
    assert _BLOCK_KEYS == ("block", "points")
    return (
        b"["
        + b",".join(
            b'{"block":%b,"points":%b}' % (to_json(int(block)), TREND_POINTS.points(rows))
            for block, rows in blocks
        )
        + b"]"
    )
