"""What every route receives from the app factory: the settings and what they decide.

The settings are built once, in ``create_app`` (or ``main()``), and reach a route only through
these dependencies, so a default the server applies is stated here once and never re-declared
by a route, a query or a schema.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Query, Request
from pydantic.json_schema import SkipJsonSchema

from alphawatch.settings import Settings
from alphawatch.vocabulary import FitMethod


async def get_settings(request: Request) -> Settings:
    # async: no I/O here, and a sync dependency would cost a thread-pool hop per request.
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]

# The schema lists the fit methods (alphawatch.vocabulary.FitMethod): an unknown one is a 422.
MethodName = Literal[tuple(m.value for m in FitMethod)]  # type: ignore[valid-type]


async def fit_method(
    settings: SettingsDep,
    # Absent, not null: the schema lists the methods only.
    method: Annotated[
        MethodName | SkipJsonSchema[None],  # type: ignore[valid-type]
        Query(
            description="fit method; methods are never mixed (default: the "
            "server's, ALPHAWATCH_FIT_METHOD, which its worker "
            "computes)"
        ),
    ] = None,
) -> FitMethod:
    """The method a request names, else the one the server's worker computes and gates with."""
    return FitMethod(method) if method is not None else settings.fit_method


MethodDep = Annotated[FitMethod, Depends(fit_method)]
