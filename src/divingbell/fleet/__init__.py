"""The fleet service: machines discovered, given roles and their configuration, reporting back.

Everything here but `client.py` and `agent_source.py` needs the `fleet` extra (FastAPI,
SQLAlchemy, Alembic, psycopg); the node agent imports only those two, which are stdlib-only.
"""
