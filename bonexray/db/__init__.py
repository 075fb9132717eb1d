"""The database: schema, migrations, writes and queries (SQLAlchemy 2.0 + Alembic)."""
