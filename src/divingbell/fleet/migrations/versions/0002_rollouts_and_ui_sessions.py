"""Rollouts (and their members) and web UI sessions.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('rollouts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('from_revision', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('policy', sa.JSON(), nullable=False),
    sa.Column('waves', sa.JSON(), nullable=False),
    sa.Column('gate', sa.JSON(), nullable=True),
    sa.Column('failures', sa.JSON(), nullable=False),
    sa.Column('rollback', sa.Boolean(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('started_by', sa.String(length=64), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rollouts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rollouts_status'), ['status'], unique=False)
    op.create_table('rollout_members',
    sa.Column('rollout_id', sa.Integer(), nullable=False),
    sa.Column('machine_id', sa.String(length=32), nullable=False),
    sa.Column('wave', sa.Integer(), nullable=False),
    sa.Column('progress', sa.String(length=16), nullable=False),
    sa.Column('previous_revision', sa.Integer(), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['rollout_id'], ['rollouts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('rollout_id', 'machine_id')
    )
    with op.batch_alter_table('rollout_members', schema=None) as batch_op:
        batch_op.create_index('ix_rollout_members_machine', ['machine_id', 'rollout_id'],
                              unique=False)
    op.create_table('ui_sessions',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('secret_hash', sa.String(length=64), nullable=False),
    sa.Column('token_id', sa.String(length=32), nullable=False),
    sa.Column('csrf', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['token_id'], ['tokens.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ui_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ui_sessions_token_id'), ['token_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('ui_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ui_sessions_token_id'))
    op.drop_table('ui_sessions')
    with op.batch_alter_table('rollout_members', schema=None) as batch_op:
        batch_op.drop_index('ix_rollout_members_machine')
    op.drop_table('rollout_members')
    with op.batch_alter_table('rollouts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rollouts_status'))
    op.drop_table('rollouts')
