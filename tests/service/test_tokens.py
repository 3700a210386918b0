"""API tokens as people manage them: the CLI, scopes, expiry, revocation and the migration."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import inspect, select, update

from alembic import command
from alphawatch.cli import main
from alphawatch.service.db.migrations import alembic_config, upgrade
from alphawatch.service.db.models import ApiToken
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import (
    TokenError,
    TokenScope,
    authenticate,
    create_token,
    list_tokens,
    revoke_token,
)


def test_cli_creates_lists_and_revokes(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["token", "create", "ci", "--scope", "read", "--expires-in", "30", "--db", db_url])
        == 0
    )
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("aw_") and len(secret) > 40
    assert main(["token", "create", "ops", "--scope", "admin", "--db", db_url]) == 0
    capsys.readouterr()
    # A second active token of the same name would make `revoke NAME` ambiguous.
    assert main(["token", "create", "ci", "--db", db_url]) == 2
    assert "revoke it first" in capsys.readouterr().err

    assert main(["token", "list", "--db", db_url]) == 0
    listing = capsys.readouterr().out
    assert secret not in listing
    lines = listing.splitlines()
    assert lines[0].split() == ["NAME", "SCOPE", "CREATED", "LAST", "USED", "EXPIRES", "STATE"]
    ci = next(line for line in lines if line.startswith("ci "))
    in_30_days = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert " read " in ci and in_30_days in ci and ci.endswith("active")

    with session_scope(make_engine(db_url)) as session:
        found = authenticate(session, secret)
    assert found is not None and found.scope is TokenScope.READ
    assert main(["token", "list", "--db", db_url]) == 0
    ci = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("ci "))
    assert datetime.now(UTC).strftime("%Y-%m-%d") in ci.split("read", 1)[1]  # last used

    assert main(["token", "revoke", "ci", "--db", db_url]) == 0
    assert "revoked 1" in capsys.readouterr().out
    with session_scope(make_engine(db_url)) as session:
        assert authenticate(session, secret) is None
    assert main(["token", "revoke", "ci", "--db", db_url]) == 2
    assert "no active token" in capsys.readouterr().err
    assert main(["token", "list", "--db", db_url]) == 0
    assert next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("ci ")
    ).endswith("revoked")
    # The name is free again once its token is revoked.
    assert main(["token", "create", "ci", "--db", db_url]) == 0


def test_scopes_include_the_ones_below() -> None:
    assert TokenScope.ADMIN.allows(TokenScope.WRITE) and TokenScope.WRITE.allows(TokenScope.READ)
    assert not TokenScope.READ.allows(TokenScope.WRITE)
    assert not TokenScope.WRITE.allows(TokenScope.ADMIN)


def test_expired_tokens_are_refused(db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        secret = create_token(session, name="temp", scope=TokenScope.ADMIN, expires_in_days=1)
        assert authenticate(session, secret) is not None
        session.execute(
            update(ApiToken).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        assert authenticate(session, secret) is None
        assert authenticate(session, secret + "x") is None
        with pytest.raises(TokenError, match="no active token"):
            revoke_token(session, name="temp")
        with pytest.raises(TokenError, match="between 0 and"):
            create_token(session, name="neg", expires_in_days=-1)
        assert [t.name for t in list_tokens(session)] == ["temp"]


def test_migration_downgrade_keeps_only_plain_admin_tokens(db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        for scope in TokenScope:
            create_token(session, name=scope.value, scope=scope)
        create_token(session, name="expiring", scope=TokenScope.ADMIN, expires_in_days=5)
        create_token(session, name="gone", scope=TokenScope.ADMIN)
        revoke_token(session, name="gone")
    with make_engine(db_url).begin() as connection:
        config = alembic_config(db_url)
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    with make_engine(db_url).connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("api_token")}
        names = set(connection.execute(select(ApiToken.__table__.c.name)).scalars())
    assert "scope" not in columns and "revoked_at" not in columns
    # A read, write, expiring or revoked token must not come back as an eternal admin one.
    assert names == {"admin"}
    upgrade(db_url)
    with session_scope(make_engine(db_url)) as session:
        assert [(t.name, t.scope) for t in list_tokens(session)] == [("admin", TokenScope.ADMIN)]
