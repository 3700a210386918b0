"""The OpenAPI schema of a server whose reads need a token: every read documents it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from alphawatch.service.api.errors import documented


def with_read_security(app: FastAPI) -> None:
    """Mark the API's reads and /metrics as needing a bearer token that may answer 401."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http",
            "scheme": "bearer",
        }
        unauthorized = documented(401)[401]
        for path, operations in doc.get("paths", {}).items():
            if not (path.startswith("/api/v1/") or path == "/metrics") or path.endswith("/health"):
                continue
            for operation in operations.values():
                if operation.get("security") == []:
                    continue  # declared public by its route (the vocabulary)
                operation.setdefault("security", [{"HTTPBearer": []}])
                operation["responses"].setdefault(
                    "401",
                    {
                        "description": unauthorized["description"],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorRead"}
                            }
                        },
                    },
                )
        app.openapi_schema = doc
        return doc

    app.openapi = schema  # type: ignore[method-assign]
