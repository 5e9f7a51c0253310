"""Machines remember how they enrolled (`enrolled_with`), so that anonymous enrolments no
operator has admitted can be counted (cheaply, by an index) and capped.

Existing enrolled machines: those whose name an operator accepted count as `operator`, the
others as `boot` (unadmitted until an operator accepts them: `fleet accept --all-unadmitted`).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("enrolled_with", sa.String(length=16), nullable=True))
        batch.create_index("ix_machines_unadmitted",
                           ["enrolled_with", "hostname_accepted", "state"])
    machines = sa.table("machines", sa.column("enrolled_with", sa.String),
                        sa.column("hostname_accepted", sa.Boolean),
                        sa.column("credential_hash", sa.String), sa.column("state", sa.String))
    enrolled = sa.and_(machines.c.credential_hash != "", machines.c.state != "decommissioned")
    op.execute(machines.update().where(enrolled, machines.c.hostname_accepted.is_(True))
               .values(enrolled_with="operator"))
    op.execute(machines.update().where(enrolled, machines.c.hostname_accepted.is_(False))
               .values(enrolled_with="boot"))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_index("ix_machines_unadmitted")
        batch.drop_column("enrolled_with")
