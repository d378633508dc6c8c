"""person decisions: the decisions table

A person settles what mirrord will not decide alone (accept, dismiss, choose, approve, hold); each
decision is a row with who, when, why and what it was bound to, honoured by every replica.

Revision ID: e7d3c1a9f420
Revises: f7a3c9e1d2b4
Create Date: 2026-12-07 11:00:00
"""

import sqlalchemy as sa
import mirrord.store.models
from alembic import op

revision = 'e7d3c1a9f420'
down_revision = 'f7a3c9e1d2b4'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'decisions',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=40), nullable=False),
        sa.Column('item_id', sa.String(length=200), nullable=False),
        sa.Column('action', sa.String(length=20), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('actor', sa.String(length=200), nullable=False),
        sa.Column('at', mirrord.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column('bound', sa.JSON(), nullable=False),
        sa.Column('active', sa.Boolean(), nullable=False),
        sa.Column('ended_at', mirrord.store.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column('ended_why', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_decisions')),
    )
    op.create_index('ix_decisions_item', 'decisions', ['kind', 'item_id'])
    op.create_index('ix_decisions_active', 'decisions', ['active', 'action'])
    op.create_index('ix_decisions_at', 'decisions', ['at'])


def downgrade() -> None:
    op.drop_index('ix_decisions_at', table_name='decisions')
    op.drop_index('ix_decisions_active', table_name='decisions')
    op.drop_index('ix_decisions_item', table_name='decisions')
    op.drop_table('decisions')
