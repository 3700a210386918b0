"""API tokens: shown once at creation, stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from alphawatch.service.db.models import ApiToken


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, *, name: str) -> str:
    """Create a token called ``name``; the returned secret is not stored anywhere."""
    token = "aw_" + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_hash=_hash(token)))
    session.flush()
    return token


def verify_token(session: Session, token: str) -> bool:
    """Whether ``token`` is a known token (constant-time on the hash lookup)."""
    found = session.scalars(select(ApiToken.token_hash).where(ApiToken.token_hash == _hash(token)))
    stored = found.first()
    return stored is not None and secrets.compare_digest(stored, _hash(token))
