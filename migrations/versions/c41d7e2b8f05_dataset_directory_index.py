"""dataset directory index: datasets.local_dir

Every completeness check of a dataset reads the other collections recorded in its directory (whose
files could be the same, see `jobs/datafiles.py`); without an index that read scans every dataset
ever recorded, once per check.

Revision ID: c41d7e2b8f05
Revises: dd5a1c7e9b42
Create Date: 2026-12-07 06:00:00
"""

from alembic import op


revision = 'c41d7e2b8f05'
down_revision = 'dd5a1c7e9b42'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_datasets_local_dir', 'datasets', ['local_dir'])


def downgrade() -> None:
    op.drop_index('ix_datasets_local_dir', table_name='datasets')
