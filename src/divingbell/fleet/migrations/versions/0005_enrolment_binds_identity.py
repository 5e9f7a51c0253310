"""Fleet trust: boot tokens bound to the boot that received them, and hostnames an operator
accepted.

- tokens: `machine_id`, `bound_uuid`, `bound_mac` (a boot token's binding) and an index on
  (role, expires_at) for counting and purging pending boot tokens. Boot tokens issued before
  this migration carry no binding and were `bootstrap` tokens: they are deleted (they lived
  15 minutes at most; a machine still booting with one reboots for a fresh one).
- machines: `hostname_accepted`, and an index on hostname (unique among active machines,
  checked under the scheduler's lock). Machines already in the fleet keep the host overrides
  they were served: their hostnames are accepted as they stand, except where two active
  machines share one (neither is accepted until an operator decides).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BOOT_TOKEN_DESCRIPTION = "network boot (issued by /v1/ipxe)"


def upgrade() -> None:
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("machine_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("bound_uuid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("bound_mac", sa.String(length=17), nullable=True))
        batch_op.create_index("ix_tokens_role_expires", ["role", "expires_at"], unique=False)
    with op.batch_alter_table("machines", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hostname_accepted", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.create_index(batch_op.f("ix_machines_hostname"), ["hostname"], unique=False)
    tokens = sa.table("tokens", sa.column("role", sa.String), sa.column("description", sa.String))
    op.execute(tokens.delete().where(tokens.c.role == "bootstrap",
                                     tokens.c.description == BOOT_TOKEN_DESCRIPTION))
    op.execute(
        "UPDATE machines SET hostname_accepted = true WHERE hostname <> '' "
        "AND state NOT IN ('booting', 'decommissioned') AND hostname IN ("
        "SELECT hostname FROM machines WHERE state NOT IN ('booting', 'decommissioned') "
        "GROUP BY hostname HAVING COUNT(*) = 1)")


def downgrade() -> None:
    with op.batch_alter_table("machines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_machines_hostname"))
        batch_op.drop_column("hostname_accepted")
    with op.batch_alter_table("tokens", schema=None) as batch_op:
        batch_op.drop_index("ix_tokens_role_expires")
        batch_op.drop_column("bound_mac")
        batch_op.drop_column("bound_uuid")
        batch_op.drop_column("machine_id")
