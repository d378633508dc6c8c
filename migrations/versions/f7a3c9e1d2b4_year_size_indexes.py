"""year-size indexes: what changed (updated_at), PDB code rivals, state with updated_at

The PDIS decision pass reads only what changed since its last pass (by `updated_at`), and each
dataset's rivals for its PDB code (by the code in any letter case, then by experiment); without
these indexes each of those reads scans every row a year of collections leaves behind. The /metrics
gauges (count and oldest change of each state) and the status page's lists read (state, updated_at)
of each item table: from that index alone, not from the wide rows. Each ISPyB poll reads the
collections it knows of the sessions it polls (by session_id).

Revision ID: f7a3c9e1d2b4
Revises: c41d7e2b8f05
Create Date: 2026-12-07 11:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = 'f7a3c9e1d2b4'
down_revision = 'c41d7e2b8f05'
branch_labels = None
depends_on = None

TABLES = ('uploads', 'datasets', 'depositions', 'annotations')


def upgrade() -> None:
    op.create_index('ix_datasets_updated_at', 'datasets', ['updated_at'])
    op.create_index('ix_datasets_experiment_id', 'datasets', ['experiment_id'])
    op.create_index('ix_datasets_session_id', 'datasets', ['session_id'])
    op.create_index('ix_experiments_updated_at', 'experiments', ['updated_at'])
    op.create_index('ix_experiments_pdb_code_upper', 'experiments', [sa.text('upper(pdb_code)')])
    op.create_index('ix_depositions_updated_at', 'depositions', ['updated_at'])
    for table in TABLES:
        op.create_index(f'ix_{table}_state_updated', table, ['state', 'updated_at'])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f'ix_{table}_state_updated', table_name=table)
    op.drop_index('ix_depositions_updated_at', table_name='depositions')
    op.drop_index('ix_experiments_pdb_code_upper', table_name='experiments')
    op.drop_index('ix_experiments_updated_at', table_name='experiments')
    op.drop_index('ix_datasets_session_id', table_name='datasets')
    op.drop_index('ix_datasets_experiment_id', table_name='datasets')
    op.drop_index('ix_datasets_updated_at', table_name='datasets')
