"""Create the artefacts table.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "artefacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slug", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=255), nullable=False),
        sa.Column("input_text", sa.Text(), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=False,
        ),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("blob_bytes", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("visibility", sa.String(length=16), server_default="public", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "visibility IN ('public', 'unlisted', 'private')",
            name=op.f("ck_artefacts_visibility_allowed"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artefacts")),
    )
    op.create_index(op.f("ix_artefacts_slug"), "artefacts", ["slug"], unique=True)
    op.create_index(op.f("ix_artefacts_kind"), "artefacts", ["kind"], unique=False)
    op.create_index(op.f("ix_artefacts_model_name"), "artefacts", ["model_name"], unique=False)
    op.create_index(op.f("ix_artefacts_created_at"), "artefacts", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_artefacts_created_at"), table_name="artefacts")
    op.drop_index(op.f("ix_artefacts_model_name"), table_name="artefacts")
    op.drop_index(op.f("ix_artefacts_kind"), table_name="artefacts")
    op.drop_index(op.f("ix_artefacts_slug"), table_name="artefacts")
    op.drop_table("artefacts")
