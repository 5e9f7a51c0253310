"""Machines carry what a scheduling pass needs of their roles in an indexed column
(`scheduling`: `unassigned`, `control-plane`, or NULL for workers), so that a registration's
scheduling pass reads the control plane and the unassigned machines only, not the whole fleet.

Existing machines get it from their roles: an empty list (or JSON null) is `unassigned`, any list
holding `control-plane` is `control-plane`, anything else NULL. Roles are JSON, compared as
their text, the same on SQLite and PostgreSQL.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.add_column(sa.Column("scheduling", sa.String(length=16), nullable=True))
        batch.create_index("ix_machines_scheduling", ["scheduling", "state"])
    machines = sa.table("machines", sa.column("roles", sa.JSON),
                        sa.column("scheduling", sa.String))
    roles_text = sa.cast(machines.c.roles, sa.Text)
    op.execute(machines.update().where(roles_text.in_(("[]", "null")))
               .values(scheduling="unassigned"))
    op.execute(machines.update().where(roles_text.like('%"control-plane"%'))
               .values(scheduling="control-plane"))


def downgrade() -> None:
    with op.batch_alter_table("machines") as batch:
        batch.drop_index("ix_machines_scheduling")
        batch.drop_column("scheduling")
