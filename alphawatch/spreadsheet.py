"""CSV that a spreadsheet opens as data, never as formulas.

Layer names come from tensor keys, and a checkpoint's keys are whatever its file says: a key
such as ``=HYPERLINK("http://…")`` or ``+cmd|' /C calc'!A0`` would run as a formula in the
spreadsheet of whoever opens an export. Every CSV alphawatch writes (the API's
``/runs/{id}/layers.csv``, ``alphawatch analyze --format csv``) goes through :func:`write_csv`,
which follows OWASP's advice on CSV injection: a text cell starting with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return gets a leading single quote, and every text cell is quoted.
Numbers are written as numbers: a negative alpha is data, not a formula. Standard library only,
so the service and the CLI share it from the bottom layer.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""What makes Excel, LibreOffice or Google Sheets read a cell as a formula (OWASP)."""


def cell(value: Any) -> Any:
    """``value`` as a CSV cell: text that a spreadsheet would read as a formula gets a leading
    ``'`` (shown as text, the quote hidden); numbers, booleans and ``None`` are left alone."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return f"'{value}"
    return value


def write_csv(out: TextIO, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write a header of ``columns`` and one line per row (keys not in ``columns`` ignored),
    each text cell passed through :func:`cell` and quoted."""
    # QUOTE_NONNUMERIC quotes every text cell (as OWASP asks) and leaves numbers bare.
    writer = csv.DictWriter(
        out, fieldnames=list(columns), extrasaction="ignore", quoting=csv.QUOTE_NONNUMERIC
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({key: cell(value) for key, value in row.items()})
