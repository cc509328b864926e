"""Artefacts found by a content key (a feature dashboard is stored once per feature,
transcoder set and corpus, and found again by its key).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("artefacts") as batch:
        batch.add_column(sa.Column("lookup_key", sa.String(length=64), nullable=True))
    # Unique per kind; rows without a key (NULL) never collide, on SQLite and PostgreSQL.
    op.create_index(
        "ix_artefacts_kind_lookup_key", "artefacts", ["kind", "lookup_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ix_artefacts_kind_lookup_key", table_name="artefacts")
    with op.batch_alter_table("artefacts") as batch:
        batch.drop_column("lookup_key")
