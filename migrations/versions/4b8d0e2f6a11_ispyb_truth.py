"""ispyb truth: datasets.experiment_type, from the group's experimentType (OSC, Mesh, …)

The real py-ispyb tells a grid scan from a rotation only by `DataCollectionGroup.experimentType`,
so the dataset keeps it for the deposit policy.

Revision ID: 4b8d0e2f6a11
Revises: 3f1c2a9d7e10
Create Date: 2026-12-07 02:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '4b8d0e2f6a11'
down_revision = '3f1c2a9d7e10'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.add_column(sa.Column('experiment_type', sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.drop_column('experiment_type')
