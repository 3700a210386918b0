"""Where a run lives: a local path, or an object-store URL (``s3://``, ``gs://``).

The one vocabulary every layer shares for "a place checkpoints are written to": the CLI parses
its arguments with :func:`location`, the settings split ``ALPHAWATCH_ALLOWED_ROOTS`` with it,
the API validates registrations with :func:`object_url` and :func:`url_allowed`, and the
worker hands an :class:`ObjectURL` to the object-store reader
(``alphawatch.workers.checkpoints.objects``) where a :class:`~pathlib.Path` goes to the local
one. Standard library only: nothing here reads a byte.

An object URL is accepted only in a normal form, so that the text stored for a run, compared
with the allowed roots and joined with the names of its objects is the one the store is asked
for: a supported scheme, a bucket, and a key of plain segments — no empty segment (``a//b``),
no ``.`` or ``..``, no control character, no query, fragment or credentials (``user@``): the
credentials come from each cloud's standard chain, never from a URL that would be stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SCHEMES = ("s3", "gs", "gcs")
"""URL schemes read through fsspec: ``s3`` (s3fs; S3-compatible stores through
``AWS_ENDPOINT_URL``), ``gs``/``gcs`` (gcsfs)."""

URL_MAX = 1024
"""The longest URL accepted: S3 and GCS keys are at most 1,024 bytes."""

_SCHEME = re.compile(r"([a-z][a-z0-9]*)://(.*)", re.DOTALL)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")

# A key segment as the API takes it: printable ASCII but '/', '?', '#' and '\', at most 63
# characters, never '.' or '..' (written without look-arounds, which regex engines differ on).
_NO_DOT = r"[ !\"$%&'()*+,\-0-9:;<=>@A-Z\[\]^_`a-z{|}~]"
_ANY = r"[ !\"$%&'()*+,\-.0-9:;<=>@A-Z\[\]^_`a-z{|}~]"
_SEGMENT = rf"(?:{_NO_DOT}{_ANY}{{0,62}}|\.{_NO_DOT}{_ANY}{{0,61}}|\.\.{_ANY}{{1,61}})"
URL_PATTERN = (
    "^(?:" + "|".join(SCHEMES) + r")://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
    rf"(?:/{_SEGMENT}){{0,12}}/?$"
)
"""The run URLs the API takes (its JSON Schema), a subset of :func:`object_url`'s: at most 12
key segments of plain printable ASCII, so never longer than :data:`URL_MAX`. The CLI takes any
URL :func:`object_url` takes."""


class ObjectURL(str):
    """A normalised object-store URL (``s3://bucket/prefix/run``), without a trailing slash.

    A ``str``: it is stored, compared and shown as its text. Make one with :func:`object_url`.
    """

    __slots__ = ()

    @property
    def scheme(self) -> str:
        return self.partition("://")[0]

    @property
    def bucket(self) -> str:
        return self.partition("://")[2].partition("/")[0]

    @property
    def key(self) -> str:
        """The key prefix below the bucket ("" for the bucket itself)."""
        return self.partition("://")[2].partition("/")[2]

    @property
    def name(self) -> str:
        """The last segment, as ``Path.name`` is (the bucket for a bucket URL)."""
        return self.rpartition("/")[2]

    def joined(self, relative: str) -> ObjectURL:
        """The URL of ``relative`` (``/``-separated plain segments) below this one."""
        return object_url(f"{self}/{relative}")

    def joined_text(self, relative: str) -> str:
        """The text of ``relative`` below this URL, not normalised (a refused key is shown
        as it is)."""
        return f"{self}/{relative}"

    def under(self, root: str) -> bool:
        """Whether this URL is ``root`` or lies below it (segment by segment)."""
        root = root.rstrip("/")
        return self == root or self.startswith(root + "/")


def is_url(text: str | Path) -> bool:
    """Whether ``text`` has the form ``scheme://…`` (a ``Path`` never has: it collapses ``//``)."""
    return isinstance(text, str) and _SCHEME.fullmatch(text) is not None


def object_url(text: str) -> ObjectURL:
    """``text`` as a normalised :class:`ObjectURL`.

    Raises:
        ValueError: not a URL of a supported scheme, or not in normal form; the message says
            which rule it breaks (the text itself is shown only up to its first 200 characters,
            escaped).
    """
    if isinstance(text, ObjectURL):
        return text
    shown = repr(text[:200])
    match = _SCHEME.fullmatch(text)
    if match is None:
        raise ValueError(f"{shown} is not a URL (scheme://bucket/prefix)")
    scheme, rest = match.groups()
    if scheme not in SCHEMES:
        raise ValueError(
            f"{shown}: the scheme {scheme!r} is not supported (only {', '.join(SCHEMES)})"
        )
    if len(text) > URL_MAX:
        raise ValueError(f"{shown}…: longer than {URL_MAX} characters")
    if not text.isprintable() or any(c in text for c in "?#\\"):
        raise ValueError(
            f"{shown}: control characters, '?', '#' and '\\' are not allowed in a run's URL"
        )
    bucket, _, key = rest.rstrip("/").partition("/")
    if "@" in bucket or ":" in bucket:
        raise ValueError(
            f"{shown}: credentials or a port in the URL are not accepted; credentials come from "
            "the cloud's standard chain (environment, profile, instance identity)"
        )
    if _BUCKET.fullmatch(bucket) is None:
        raise ValueError(f"{shown}: {bucket!r} is not a bucket name")
    if key and any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(
            f"{shown}: a key with an empty, '.' or '..' segment is not accepted (a run's URL "
            "names its prefix plainly)"
        )
    return ObjectURL(f"{scheme}://{bucket}" + (f"/{key}" if key else ""))


def location(text: str | Path) -> Path | ObjectURL:
    """A run's place from its text: an :class:`ObjectURL` for a URL, else a ``Path``.

    Raises:
        ValueError: a URL that :func:`object_url` refuses.
    """
    if isinstance(text, Path):
        return text
    return object_url(text) if is_url(text) else Path(text)


def split_roots(values: Iterable[str | Path]) -> tuple[list[str | Path], list[ObjectURL]]:
    """Allowed roots split into local paths (as given) and normalised URL prefixes.

    Raises:
        ValueError: a URL root that :func:`object_url` refuses.
    """
    local: list[str | Path] = []
    urls: list[ObjectURL] = []
    for value in values:
        if is_url(value):
            urls.append(object_url(str(value)))
        else:
            local.append(value)
    return local, urls


def url_allowed(url: ObjectURL, roots: Iterable[str]) -> bool:
    """Whether ``url`` is one of ``roots`` or lies below one (segment by segment)."""
    return any(url.under(root) for root in roots)
