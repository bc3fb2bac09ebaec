"""The database that tenancy and heads share: connections with deadlines, the tables, the migrations.

One package owns it so that neither part reaches into the other's files for a table, and one
Alembic history (``migrations/``, version table ``alembic_version``) versions every table:
``connection`` opens a database and upgrades it, ``schema`` is what the code queries. Parts
above (``tenancy``, ``heads``) import from here; this package imports no other polyray part.
"""
