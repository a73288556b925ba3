"""The embedded store's files: one way to open a local SQLite database."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: str | Path) -> sqlite3.Connection:
    """A database file (its folder made if need be): autocommit, write-ahead log, and
    ``synchronous=FULL`` so that a record written (a queued job, a session's usage) is kept
    through a crash or a power loss."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
