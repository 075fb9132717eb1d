"""Alembic revision scripts, applied in order by `bonexray.db.session.upgrade_schema`."""
