"""Artefact parts: pieces of an artefact loaded one at a time (e.g. one layer).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "artefact_parts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("artefact_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("blob_bytes", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["artefact_id"],
            ["artefacts.id"],
            name=op.f("fk_artefact_parts_artefact_id_artefacts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artefact_parts")),
        sa.UniqueConstraint("artefact_id", "name", name="uq_artefact_parts_name"),
    )
    op.create_index(
        op.f("ix_artefact_parts_artefact_id"), "artefact_parts", ["artefact_id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_artefact_parts_artefact_id"), table_name="artefact_parts")
    op.drop_table("artefact_parts")
