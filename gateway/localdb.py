"""The embedded store's files: one way to open a local SQLite database."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

FILE_MODE = 0o600  # jobs and usage are the operator's business, not other local users'
DIR_MODE = 0o700


def open_db(path: str | Path) -> sqlite3.Connection:
    """A database file (its folder made if need be): autocommit, write-ahead log, and
    ``synchronous=FULL`` so that a record written (a queued job, a session's usage) is kept
    through a crash or a power loss. The file (and its -wal and -shm files, which SQLite
    creates with the database's mode) is readable by its owner only, and deleted rows are
    overwritten (``secure_delete``), not left in free pages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(file, FILE_MODE)  # a file made before this rule, or under a loose umask
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA secure_delete=ON")
    return db
