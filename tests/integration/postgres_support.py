"""Where the integration tests find PostgreSQL (127.0.0.1:5432, user postgres with trust auth; README.md, *Tests need Redis and PostgreSQL*)."""

from __future__ import annotations

PG_HOST, PG_PORT = "127.0.0.1", 5432
ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def database_url(name: str) -> str:
    return f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{name}"
