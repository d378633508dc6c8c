"""deposition PDB code index: which deposition carries a code, by the code in any letter case

The remedies that /status, /api/status and `mirrord status` give each needs-attention deposition
name the deposition that already carries its PDB code; each decision pass reads a changed dataset's
rivals by code the same way. Without this index both read every deposition in the carrying states
(a year's published ones).

Revision ID: a1d9e3c7b5f2
Revises: 9c4e2a7d5b13
Create Date: 2026-12-07 14:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = 'a1d9e3c7b5f2'
down_revision = '9c4e2a7d5b13'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_depositions_pdb_code_upper', 'depositions', [sa.text('upper(pdb_code)')])


def downgrade() -> None:
    op.drop_index('ix_depositions_pdb_code_upper', table_name='depositions')
