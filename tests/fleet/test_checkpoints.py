"""The service's SQLite store copies its write-ahead log back into the database file in a
thread of its own (db.Checkpointer), never inside a commit: a commit that checkpoints holds the
one write lock through an fsync, and every report waits behind it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from divingbell.fleet import db as db_module
from divingbell.fleet.db import Database
from tests.fleet.servers import wait_for

ROWS = 3000
PAYLOAD = "x" * 2000
"""Each row about half a page: some 6 MB in all, past SQLite's automatic checkpoint at 1,000
pages of log."""


def write_rows(db: Database, first: int) -> None:
    for start in range(first, first + ROWS, 100):
        with db.write_conn() as connection:
            connection.execute(text("INSERT INTO filler (id, payload) VALUES (:id, :payload)"),
                               [{"id": n, "payload": PAYLOAD} for n in range(start, start + 100)])


def test_commits_leave_checkpoints_to_the_background_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.db"
    url = f"sqlite:///{path}"
    monkeypatch.setattr(db_module, "CHECKPOINT_SECONDS", 3600.0)  # not during the writes
    store = Database(url, background_checkpoints=True)
    try:
        with store.write_conn() as connection:
            connection.execute(text("CREATE TABLE filler (id INTEGER PRIMARY KEY, payload TEXT)"))
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        with store.read_conn() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        before = path.stat().st_size
        write_rows(store, 0)
        # Every page went to the log; no commit copied any of it into the file.
        assert path.stat().st_size == before
        assert Path(f"{path}-wal").stat().st_size > ROWS * len(PAYLOAD)
    finally:
        store.dispose()

    monkeypatch.setattr(db_module, "CHECKPOINT_SECONDS", 0.05)
    store = Database(url, background_checkpoints=True)
    try:
        write_rows(store, ROWS)
        checkpointer = store._checkpointer
        assert checkpointer is not None
        # Both rounds copied, by the thread: it counts a checkpoint only after SQLite's answer,
        # so the file can grow a moment before the count does.
        wait_for(lambda: path.stat().st_size > 2 * ROWS * len(PAYLOAD)
                 and checkpointer.checkpoints >= 1)
    finally:
        store.dispose()
    assert not checkpointer._thread.is_alive()


def test_other_stores_checkpoint_as_sqlite_does(tmp_path: Path) -> None:
    """The CLI's own short-lived stores keep SQLite's automatic checkpoints (no thread)."""
    store = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        assert store._checkpointer is None
        with store.write_conn() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    finally:
        store.dispose()
