"""``GET /api/v1/vocabulary``: the statistics, filters, outlier rules, kinds and fit methods.

Clients (the dashboard first) build their pickers from this answer instead of copying the lists,
so a statistic or kind added in :mod:`alphawatch.vocabulary` shows up everywhere at once.
"""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from alphawatch import vocabulary as words
from alphawatch.service.api.deps import SettingsDep


class Term(BaseModel):
    name: str = Field(description="the value a query parameter takes")
    label: str = Field(description="how a person reads it")
    default: bool = Field(False, description="what the API assumes when the parameter is absent")


class StatisticTerm(Term):
    level: bool = Field(description="a level of the metric (a band can gate it), not a spread")


class KindGroupTerm(Term):
    kinds: list[str] = Field(description="the kinds the group stands for, in kind order")


class VocabularyRead(BaseModel):
    statistics: list[StatisticTerm]
    filters: list[Term]
    outlier_rules: list[Term]
    kinds: list[str] = Field(description="every layer kind, in the order a model runs them")
    kind_groups: list[KindGroupTerm]
    sources: list[Term] = Field(
        description="what a row's spectrum is of: weights, gradients, "
        "nested widths; never mixed in one statistic"
    )
    variant_pattern: str = Field(description="the values the variant parameter takes")
    variant_separator: str = Field(description="joins a layer's name and its variant")
    orders: list[Term] = Field(description="layer orders of heatmaps and per-block trends")
    fit_methods: list[Term] = Field(
        description="power-law fit methods; never mixed in a trend; "
        "the default is the server's, which its worker "
        "computes"
    )


@functools.cache
def _build(fit_method: words.FitMethod) -> VocabularyRead:
    return VocabularyRead(
        statistics=[
            StatisticTerm(
                name=s.value, label=s.label, level=s.is_level, default=s is words.DEFAULT_STATISTIC
            )
            for s in words.Statistic
        ],
        filters=[
            Term(name=f.value, label=f.label, default=f is words.DEFAULT_FILTER)
            for f in words.LayerFilter
        ],
        outlier_rules=[
            Term(name=r.value, label=r.label, default=r is words.DEFAULT_OUTLIER_RULE)
            for r in words.OutlierRule
        ],
        kinds=[k.value for k in words.KIND_ORDER],
        kind_groups=[
            KindGroupTerm(
                name=g.name,
                label=g.label,
                kinds=[k.value for k in words.KIND_ORDER if k in g.kinds],
            )
            for g in words.KIND_GROUPS
        ],
        sources=[
            Term(name=s.value, label=s.label, default=s.value == words.DEFAULT_VARIANT)
            for s in words.Source
        ],
        variant_pattern=words.VARIANT_PATTERN,
        variant_separator=words.VARIANT_SEPARATOR,
        orders=[
            Term(name=o.value, label=o.label, default=o is words.DEFAULT_ORDER)
            for o in words.LayerOrder
        ],
        fit_methods=[
            Term(name=m.value, label=m.label, default=m is fit_method) for m in words.FitMethod
        ],
    )


async def current_vocabulary(settings: SettingsDep) -> VocabularyRead:
    """The vocabulary of this alphawatch version as this server applies it (a dependency, so a
    test may serve another)."""
    return _build(settings.fit_method)


# Public like /docs, whose OpenAPI schema lists the same values: the page needs it before any
# token is typed in.
vocabulary_router = APIRouter(prefix="/api/v1")


@vocabulary_router.get("/vocabulary", response_model=VocabularyRead, openapi_extra={"security": []})
async def get_vocabulary(
    terms: Annotated[VocabularyRead, Depends(current_vocabulary)],
) -> VocabularyRead:
    """Statistics, layer filters, outlier rules, layer kinds in order and kind groups."""
    return terms
