"""Alembic environment for mirrord.

mirrord runs migrations in-process (`mirrord db upgrade`, and at start-up) on a connection it
opened itself, passed in `config.attributes["connection"]`; this file never configures logging,
so the application's log setup stays as it is.
"""

from alembic import context

from mirrord.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `mirrord db upgrade`, which supplies the connection")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs table copies for ALTERs
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
