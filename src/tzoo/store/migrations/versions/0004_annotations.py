"""Annotations: threaded comments on visualizations, anchored to layer/head/tokens.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("artefact_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("stack", sa.String(length=16), nullable=True),
        sa.Column("layer", sa.Integer(), nullable=True),
        sa.Column("head", sa.Integer(), nullable=True),
        sa.Column("token_start", sa.Integer(), nullable=True),
        sa.Column("token_end", sa.Integer(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("deleted", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.CheckConstraint(
            "layer IS NULL OR layer >= 0", name=op.f("ck_annotations_layer_not_negative")
        ),
        sa.CheckConstraint(
            "head IS NULL OR head >= 0", name=op.f("ck_annotations_head_not_negative")
        ),
        sa.CheckConstraint(
            "(token_start IS NULL AND token_end IS NULL) OR "
            "(token_start >= 0 AND token_end >= token_start)",
            name=op.f("ck_annotations_token_range_ordered"),
        ),
        sa.ForeignKeyConstraint(
            ["artefact_id"],
            ["artefacts.id"],
            name=op.f("fk_annotations_artefact_id_artefacts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["author_id"],
            ["users.id"],
            name=op.f("fk_annotations_author_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["annotations.id"],
            name=op.f("fk_annotations_parent_id_annotations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotations")),
    )
    op.create_index(op.f("ix_annotations_artefact_id"), "annotations", ["artefact_id"], unique=False)
    op.create_index(op.f("ix_annotations_parent_id"), "annotations", ["parent_id"], unique=False)
    op.create_index(op.f("ix_annotations_author_id"), "annotations", ["author_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_annotations_author_id"), table_name="annotations")
    op.drop_index(op.f("ix_annotations_parent_id"), table_name="annotations")
    op.drop_index(op.f("ix_annotations_artefact_id"), table_name="annotations")
    op.drop_table("annotations")
