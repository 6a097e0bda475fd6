"""Schema migrations: numbered SQL files in ``migrations/``, applied in order at start-up.

Each file ``NNNN_description.sql`` runs in its own transaction together with the row that
records it in ``schema_version``, so a failing file leaves the database at the previous
version. A database whose recorded version is higher than the newest file was written by a
newer release. It is rejected, because this code does not know its schema.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIGRATIONS_DIR", "Migration", "MigrationError", "apply_migrations", "find_migrations"]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
FILE_PATTERN = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


class MigrationError(RuntimeError):
    """The migrations cannot be applied; the message names the file or version and the fix."""


@dataclass(frozen=True)
class Migration:
    """One SQL file: its version number, name and path."""

    version: int
    name: str
    path: Path


def find_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """List the migration files in ``directory`` sorted by version.

    Raises:
        MigrationError: a ``.sql`` file is misnamed, or versions repeat or skip a number.
    """
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_PATTERN.fullmatch(path.name)
        if match is None:
            raise MigrationError(
                f"Invalid migration file name {path.name!r} in {directory}: "
                "name it NNNN_description.sql, e.g. 0002_add_index.sql."
            )
        migrations.append(Migration(int(match[1]), match[2], path))

    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"Migration {migration.path.name} has version {migration.version}, "
                f"expected {expected}: versions must run 1, 2, 3... without gaps or repeats."
            )
    return migrations


def apply_migrations(connection: sqlite3.Connection, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply the migrations newer than the database's version; return the versions applied.

    ``connection`` must be in autocommit mode (``isolation_level=None``), because each file
    runs inside an explicit ``BEGIN IMMEDIATE`` ... ``COMMIT``.

    Raises:
        MigrationError: the database is newer than the code, a file is misnamed, or a file
            failed (its changes are rolled back and the message names the file).
    """
    if connection.isolation_level is not None:
        raise ValueError("apply_migrations needs a connection with isolation_level=None")

    migrations = find_migrations(directory)
    connection.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_version (
            version    INTEGER PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at REAL NOT NULL
        )
        """
    )
    current = current_version(connection)
    newest = migrations[-1].version if migrations else 0
    if current > newest:
        raise MigrationError(
            f"The database has schema version {current}, but this version of imagine only "
            f"knows migrations up to {newest}. It was written by a newer imagine: upgrade "
            "imagine, or point IMAGINE_DATA_DIR at another directory."
        )

    applied = []
    for migration in migrations:
        if migration.version <= current:
            continue
        _apply_one(connection, migration)
        applied.append(migration.version)
        log.info("Applied database migration %s", migration.path.name)
    return applied


def current_version(connection: sqlite3.Connection) -> int:
    """Return the highest version recorded in ``schema_version`` (0 for a new database)."""
    row = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return row[0] or 0


def _apply_one(connection: sqlite3.Connection, migration: Migration) -> None:
    statements = split_statements(migration.path.read_text(encoding="utf-8"))
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            connection.execute(statement)
        connection.execute(
            """
            INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)
            """,
            (migration.version, migration.name, time.time()),
        )
    except sqlite3.Error as error:
        connection.execute("ROLLBACK")
        raise MigrationError(
            f"Migration {migration.path.name} failed and was rolled back: {error}. "
            "Fix the file and start again."
        ) from error
    connection.execute("COMMIT")


def split_statements(script: str) -> list[str]:
    """Split an SQL script into complete statements (triggers with inner ``;`` stay whole)."""
    statements = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if _has_sql(buffer):
                statements.append(buffer.strip())
            buffer = ""
    if _has_sql(buffer):
        raise MigrationError(
            f"Incomplete SQL statement at the end of a migration: {buffer.strip()!r}"
        )
    return statements


def _has_sql(text: str) -> bool:
    # Drop `--` comments and whitespace; what remains (other than `;`) is a statement.
    code = re.sub(r"--[^\n]*", "", text)
    return bool(code.replace(";", "").strip())
