"""dataset run number: datasets.run_number

ISPyB's dataCollectionNumber (the sample's n-th run), which `title_template` offers as `{run}`. The
API does not expose it; it is read from the collection's file template, so rows recorded before this
revision get it from the template they already hold.

Revision ID: b8d2f4a61c07
Revises: e7d3c1a9f420
Create Date: 2026-12-07 14:00:00
"""

import sqlalchemy as sa
from alembic import op

from mirrord.clients.ispyb import run_number

revision = 'b8d2f4a61c07'
down_revision = 'e7d3c1a9f420'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.add_column(sa.Column('run_number', sa.Integer(), nullable=True))
    datasets = sa.table('datasets', sa.column('id', sa.Integer()), sa.column('file_template', sa.Text()),
                        sa.column('run_number', sa.Integer()))
    connection = op.get_bind()
    rows = connection.execute(sa.select(datasets.c.id, datasets.c.file_template)
                              .where(datasets.c.file_template.is_not(None))).all()
    runs = [{"row_id": row.id, "run": run} for row in rows if (run := run_number(row.file_template)) is not None]
    if runs:
        connection.execute(datasets.update().where(datasets.c.id == sa.bindparam("row_id"))
                           .values(run_number=sa.bindparam("run")), runs)


def downgrade() -> None:
    with op.batch_alter_table('datasets') as batch_op:
        batch_op.drop_column('run_number')
