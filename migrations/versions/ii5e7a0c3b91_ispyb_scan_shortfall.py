"""ispyb scan shortfall: sessions.short_*; every session is read again

Releases before this one asked `/events` with `eventType=dc`, which the real py-ispyb reads as an
experiment type and answers with nothing, yet stored the session as scanned. The scan state they
stored is therefore void: clearing it makes an upgraded installation read every session again by
itself. A scan that sees fewer collections than the session counts is now kept in `short_*`.

Revision ID: ii5e7a0c3b91
Revises: 4b8d0e2f6a11
Create Date: 2026-12-07 03:00:00
"""

from alembic import op
import sqlalchemy as sa

import mirrord.store.models


revision = 'ii5e7a0c3b91'
down_revision = '4b8d0e2f6a11'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('sessions') as batch_op:
        batch_op.add_column(sa.Column('short_seen', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('short_expected', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('short_since', mirrord.store.models.UTCDateTime(timezone=True), nullable=True))
    op.execute("UPDATE sessions SET scanned_collections = NULL, scanned_end = NULL, scanned_at = NULL")


def downgrade() -> None:
    with op.batch_alter_table('sessions') as batch_op:
        batch_op.drop_column('short_since')
        batch_op.drop_column('short_expected')
        batch_op.drop_column('short_seen')
