"""API tokens: shown once at creation, stored only as a SHA-256 hash, scoped, revocable.

A token is looked up in the database on every request that presents it: a revoked or expired
token is refused by the very next request, in every API process, with nothing to invalidate.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from alphawatch.service.db.models import ApiToken


class TokenScope(StrEnum):
    """What a token may do; each scope includes the ones before it."""

    READ = "read"  # every GET, including /metrics when reads need a token
    WRITE = "write"  # also register runs (POST /runs)
    ADMIN = "admin"  # also delete runs and everything stored for them

    def allows(self, needed: TokenScope) -> bool:
        order = list(TokenScope)
        return order.index(self) >= order.index(needed)


class TokenError(ValueError):
    """A token request that cannot be honoured (a name in use, an unknown name)."""


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed and as authenticated: never its secret."""

    name: str
    scope: TokenScope
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


# Writing last_used_at on every authenticated read would turn reads into writes; a minute's
# precision is enough to tell a token in use from a forgotten one.
LAST_USED_PRECISION = timedelta(minutes=1)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(moment: datetime | None) -> datetime | None:
    # SQLite hands timestamps back without their zone; alphawatch writes them in UTC.
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def _info(row: ApiToken) -> TokenInfo:
    created = _aware(row.created_at)
    assert created is not None
    return TokenInfo(
        name=row.name,
        scope=TokenScope(row.scope),
        created_at=created,
        expires_at=_aware(row.expires_at),
        last_used_at=_aware(row.last_used_at),
        revoked_at=_aware(row.revoked_at),
    )


def _active(session: Session, name: str, now: datetime) -> list[ApiToken]:
    rows = session.scalars(
        select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    ).all()
    return [r for r in rows if not _expired(r, now)]


def _expired(row: ApiToken, now: datetime) -> bool:
    expires = _aware(row.expires_at)
    return expires is not None and expires <= now


def create_token(
    session: Session,
    *,
    name: str,
    scope: TokenScope = TokenScope.WRITE,
    expires_in_days: float | None = None,
) -> str:
    """Create a token called ``name``; the returned secret is not stored anywhere.

    Raises:
        TokenError: a token of that name is active (revoke it first), or the expiry is not
            a positive number of days.
    """
    now = datetime.now(UTC)
    if not name.strip() or len(name) > 255:
        raise TokenError("a token name must be 1 to 255 characters")
    if expires_in_days is not None and not 0 < expires_in_days < 36_500:
        raise TokenError("--expires-in must be a number of days between 0 and 36500")
    if _active(session, name, now):
        raise TokenError(
            f"a token named {name!r} is active; revoke it first (alphawatch token revoke {name})"
        )
    token = "aw_" + secrets.token_urlsafe(32)
    expires = now + timedelta(days=expires_in_days) if expires_in_days is not None else None
    session.add(
        ApiToken(
            name=name,
            token_hash=_hash(token),
            scope=TokenScope(scope).value,
            created_at=now,
            expires_at=expires,
        )
    )
    session.flush()
    return token


def list_tokens(session: Session) -> list[TokenInfo]:
    """Every token, revoked and expired ones included, oldest first."""
    return [_info(r) for r in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(session: Session, *, name: str) -> int:
    """Revoke the active tokens called ``name``; how many were revoked.

    Raises:
        TokenError: no active token has that name.
    """
    now = datetime.now(UTC)
    rows = _active(session, name, now)
    if not rows:
        raise TokenError(f"no active token named {name!r}")
    for row in rows:
        row.revoked_at = now
    session.flush()
    return len(rows)


def authenticate(session: Session, token: str) -> TokenInfo | None:
    """The token's details when it is known, not revoked and not expired; else None."""
    digest = _hash(token)
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == digest)).first()
    if row is None or not secrets.compare_digest(row.token_hash, digest):
        return None
    now = datetime.now(UTC)
    if row.revoked_at is not None or _expired(row, now):
        return None
    used = _aware(row.last_used_at)
    if used is None or now - used >= LAST_USED_PRECISION:
        session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
    return _info(row)
