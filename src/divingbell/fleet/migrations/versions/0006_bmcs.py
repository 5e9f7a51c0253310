"""Machines' BMCs (out-of-band power): address, protocol, TLS trust, sealed credentials, the
last confirmed power state.

Revision ID: 0006
Revises: 0004 (the lead re-chains this after 0005 at merge)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bmcs",
        sa.Column("machine_id", sa.String(length=32), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("address", sa.String(length=512), nullable=False),
        sa.Column("verify_tls", sa.Boolean(), nullable=False),
        sa.Column("ca_pem", sa.Text(), nullable=True),
        sa.Column("sealed_credentials", sa.Text(), nullable=False),
        sa.Column("power_state", sa.String(length=16), nullable=False),
        sa.Column("power_checked_at", sa.DateTime(), nullable=True),
        sa.Column("last_request_at", sa.DateTime(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("machine_id"),
    )


def downgrade() -> None:
    op.drop_table("bmcs")
