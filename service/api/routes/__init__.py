"""REST routes, one thin router per domain: parameters in, one service call, the answer out.

``ROUTERS`` are the /api/v1 routers, each behind the read check; ``health_router`` is /health
and /metrics, outside /api/v1. The app factory includes them all.
"""

from __future__ import annotations

from fastapi import APIRouter

from alphawatch.service.api.routes import alerts, gate, layers, runs, trends
from alphawatch.service.api.routes.health import health_router

__all__ = ["ROUTERS", "health_router"]

ROUTERS: tuple[APIRouter, ...] = (
    runs.router,
    layers.router,
    trends.router,
    gate.router,
    alerts.router,
)
