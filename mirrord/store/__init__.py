"""The state store: models, engine, migrations and item helpers."""

from mirrord.store.engine import Store

__all__ = ["Store"]
