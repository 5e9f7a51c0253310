"""The fleet service: machines discovered, given roles and their configuration, reporting back.

Everything here but `client.py` needs the `fleet` extra (FastAPI, SQLAlchemy, Alembic,
psycopg); the node agent's fleet mode (`divingbell.agent.fleet_source`) imports only that one,
which is stdlib-only.
"""
