"""SQLite the way everseg's durable state uses it: the model registry and the feedback queue.

Several processes share one database file (the server's replicas, its update worker, an
operator's ``everseg models`` command); WAL lets readers go on while one writes, and
``synchronous=FULL`` makes a committed row survive a power cut, not only a ``kill -9``.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def connect(path: Path, timeout: float = 30.0) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


@contextmanager
def write_transaction(con: sqlite3.Connection, lock: threading.RLock) -> Iterator[sqlite3.Connection]:
    """One write transaction, taken at once (BEGIN IMMEDIATE), so no two writers interleave;
    ``lock`` keeps this process's threads off the connection meanwhile."""
    with lock:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
