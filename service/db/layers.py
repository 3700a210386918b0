"""Which layer rows a read takes: the layer filter, declared once for every query.

Trends, per-block trends, heatmaps, flags, histories, exports and the gate all select layer rows
by fit method, variant, kinds, block range and name; each builds its SQL conditions here, so two
views of one selection can never disagree on which rows it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement

from alphawatch.service.db.models import LayerMetric
from alphawatch.vocabulary import DEFAULT_VARIANT, VARIANT_SEPARATOR


def of_variant(variant: str) -> Any:
    """The SQL condition that keeps the rows of one variant: weights have no ``@`` in their name.

    Weights, gradients and nested widths are never mixed: every view and statistic is over one.
    """
    if variant == DEFAULT_VARIANT:
        return ~LayerMetric.name.contains(VARIANT_SEPARATOR, autoescape=True)
    return LayerMetric.name.endswith(f"{VARIANT_SEPARATOR}{variant}", autoescape=True)


@dataclass(frozen=True)
class LayerSelection:
    """The layer rows of one fit method and one variant, optionally only some kinds, a range of
    blocks or one layer name.

    Fit methods are never mixed; ``variant=None`` takes every variant (exports and the layer list
    of one checkpoint, where each row says which it is). Empty ``kinds`` means every kind.
    """

    method: str
    variant: str | None = DEFAULT_VARIANT
    kinds: tuple[str, ...] = ()
    block_min: int | None = None
    block_max: int | None = None
    name: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        """The SQL conditions on ``layer_metric`` that keep exactly these rows."""
        conditions: list[ColumnElement[bool]] = [LayerMetric.method == self.method]
        if self.variant is not None:
            conditions.append(of_variant(self.variant))
        if self.kinds:
            conditions.append(LayerMetric.kind.in_(self.kinds))
        if self.block_min is not None:
            conditions.append(LayerMetric.block >= self.block_min)
        if self.block_max is not None:
            conditions.append(LayerMetric.block <= self.block_max)
        if self.name is not None:
            conditions.append(LayerMetric.name == self.name)
        return conditions
