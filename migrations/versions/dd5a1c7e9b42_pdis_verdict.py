"""pdis verdict: depositions.detected_pdb and depositions.pdb_exists, from the upload answer

PDIS answers an upload with the PDB id it detected in the data (`pdbid`) and whether it already
holds a dataset for it (`is_pdb_exists`); the deposition keeps both, so the check before the submit
survives a restart. NULL pdb_exists: the answer was not heard (an adopted upload).

Revision ID: dd5a1c7e9b42
Revises: ii5e7a0c3b91
Create Date: 2026-12-07 03:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = 'dd5a1c7e9b42'
down_revision = 'ii5e7a0c3b91'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('depositions') as batch_op:
        batch_op.add_column(sa.Column('detected_pdb', sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column('pdb_exists', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('depositions') as batch_op:
        batch_op.drop_column('pdb_exists')
        batch_op.drop_column('detected_pdb')
