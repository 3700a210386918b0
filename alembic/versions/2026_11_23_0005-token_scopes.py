"""token scopes: scope, expiry, revocation and last use of API tokens

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 15:00:00.000000

Tokens made before this revision could register and delete runs: they become ``admin`` so
that no CI job breaks on upgrade; new tokens get the scope they are created with.
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_token") as batch:
        batch.add_column(
            sa.Column("scope", sa.String(length=16), nullable=False, server_default="admin")
        )
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Before this revision every token could do everything: a revoked, expiring or narrower
    # token must not come back as an eternal admin one, so only plain admin tokens are kept.
    op.execute(
        "DELETE FROM api_token WHERE scope <> 'admin' OR revoked_at IS NOT NULL "
        "OR expires_at IS NOT NULL"
    )
    with op.batch_alter_table("api_token") as batch:
        batch.drop_column("last_used_at")
        batch.drop_column("revoked_at")
        batch.drop_column("expires_at")
        batch.drop_column("scope")
