"""Maintenance reboots the fleet watches (issue 28): a machine whose agent said it is rebooting
and has not been heard from within its health timeout gets one BMC power cycle, then is left
for an operator (`fleet/rescue.py`). And the BMC address a machine's discovery reported
(`machines.reported_bmc`: shown, never used to power anything).

Revision ID: 0009
Revises: 0007 (0008 once the machines column of another branch is merged before it)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reboot_watches",
        sa.Column("machine_id", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heard_at", sa.DateTime(), nullable=False),
        sa.Column("health_timeout_seconds", sa.Float(), nullable=False),
        sa.Column("rescued_at", sa.DateTime(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["machine_id"], ["machines.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("machine_id"),
    )
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("reported_bmc", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_column("reported_bmc")
    op.drop_table("reboot_watches")
