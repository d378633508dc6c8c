"""spool digest: depositions.zst_sha256 becomes zst_digest, "<algorithm>:<hex>"

The spool file's digest only detects a torn or damaged spool file after a restart; xxh3-128 does
that at a fraction of sha256's cost. Rows packed before keep their sha256, now labelled as such.

Revision ID: 3f1c2a9d7e10
Revises: 0be651f31d55
Create Date: 2026-11-22 02:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '3f1c2a9d7e10'
down_revision = '0be651f31d55'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('depositions') as batch_op:
        batch_op.alter_column('zst_sha256', new_column_name='zst_digest',
                              existing_type=sa.String(length=64), type_=sa.String(length=100))
    op.execute("UPDATE depositions SET zst_digest = 'sha256:' || zst_digest WHERE zst_digest IS NOT NULL")


def downgrade() -> None:
    # Only sha256 digests fit the old column; the others are dropped (the spool is then packed again).
    op.execute("UPDATE depositions SET zst_digest = CASE WHEN zst_digest LIKE 'sha256:%' "
               "THEN substr(zst_digest, 8) ELSE NULL END")
    with op.batch_alter_table('depositions') as batch_op:
        batch_op.alter_column('zst_digest', new_column_name='zst_sha256',
                              existing_type=sa.String(length=100), type_=sa.String(length=64))
