"""Alembic migrations for the bonexray schema (a package so that they ship in the wheel)."""
