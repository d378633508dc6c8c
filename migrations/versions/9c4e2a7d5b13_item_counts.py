"""item counts: the number of items in each state, kept by triggers as items move

`/status`, `/api/status`, `/metrics` and `mirrord status` show how many items are in each state.
Counting the item tables (GROUP BY state) read a whole index on every look: a year's 250,000
collections made each scrape 15 times slower than a demo's. Triggers on the four item tables now
add a row of +1 or -1 to `item_counts` for every insert, delete and change of state, in the same
transaction, so no code path can forget one; a read sums a few rows. The rows are append-only (no
row is a hot spot two replicas' writers would queue on); the prune folds them into one per state.

A later migration that rebuilds an item table (SQLite's batch mode copies it and drops the old one)
drops its triggers with it and must create them again: tests/test_item_counts.py checks that every
item table has its triggers at head.

Revision ID: 9c4e2a7d5b13
Revises: b8d2f4a61c07
Create Date: 2026-12-07 14:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '9c4e2a7d5b13'
down_revision = 'b8d2f4a61c07'
branch_labels = None
depends_on = None

KINDS = {'uploads': 'upload', 'datasets': 'dataset', 'depositions': 'deposition', 'annotations': 'annotation'}

PG_FUNCTION = """
CREATE FUNCTION mirrord_count_states() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO item_counts (kind, state, n) VALUES (TG_ARGV[0], OLD.state, -1);
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') THEN
        INSERT INTO item_counts (kind, state, n) VALUES (TG_ARGV[0], NEW.state, 1);
    END IF;
    RETURN NULL;
END $$
"""


def _triggers(dialect: str, table: str, kind: str) -> list[str]:
    if dialect == 'postgresql':
        return [
            f"CREATE TRIGGER {table}_count_rows AFTER INSERT OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION mirrord_count_states('{kind}')",
            f"CREATE TRIGGER {table}_count_moves AFTER UPDATE OF state ON {table} FOR EACH ROW "
            f"WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION mirrord_count_states('{kind}')",
        ]
    add = "INSERT INTO item_counts (kind, state, n) VALUES ('{kind}', {row}.state, {n});"
    return [
        f"CREATE TRIGGER {table}_count_insert AFTER INSERT ON {table} BEGIN "
        f"{add.format(kind=kind, row='NEW', n=1)} END",
        f"CREATE TRIGGER {table}_count_delete AFTER DELETE ON {table} BEGIN "
        f"{add.format(kind=kind, row='OLD', n=-1)} END",
        f"CREATE TRIGGER {table}_count_move AFTER UPDATE OF state ON {table} "
        f"WHEN OLD.state IS NOT NEW.state BEGIN "
        f"{add.format(kind=kind, row='OLD', n=-1)} {add.format(kind=kind, row='NEW', n=1)} END",
    ]


def _trigger_names(dialect: str, table: str) -> list[str]:
    suffixes = ('rows', 'moves') if dialect == 'postgresql' else ('insert', 'delete', 'move')
    return [f"{table}_count_{suffix}" for suffix in suffixes]


def upgrade() -> None:
    op.create_table(
        'item_counts',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=20), nullable=False),
        sa.Column('state', sa.String(length=40), nullable=False),
        sa.Column('n', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_item_counts')),
    )
    dialect = op.get_bind().dialect.name
    if dialect == 'postgresql':
        op.execute(PG_FUNCTION)
    for table, kind in KINDS.items():
        # The items there are now, counted once; then the triggers keep the count (one transaction).
        op.execute(f"INSERT INTO item_counts (kind, state, n) "
                   f"SELECT '{kind}', state, count(*) FROM {table} GROUP BY state")
        for statement in _triggers(dialect, table, kind):
            op.execute(statement)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in KINDS:
        for name in _trigger_names(dialect, table):
            op.execute(f"DROP TRIGGER {name} ON {table}" if dialect == 'postgresql' else f"DROP TRIGGER {name}")
    if dialect == 'postgresql':
        op.execute("DROP FUNCTION mirrord_count_states()")
    op.drop_table('item_counts')
