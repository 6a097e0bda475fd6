import sqlite3
from pathlib import Path

import pytest

from bot.migrations import (
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    current_version,
    find_migrations,
    split_statements,
)


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def tables(connection: sqlite3.Connection) -> set[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


def write(directory: Path, name: str, sql: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / name).write_text(sql, encoding="utf-8")


def test_fresh_database_gets_schema(tmp_path):
    connection = connect(tmp_path / "db.sqlite3")
    applied = apply_migrations(connection)

    assert applied == [m.version for m in find_migrations(MIGRATIONS_DIR)]
    assert applied[0] == 1
    assert {"jobs", "guild_settings", "meta", "schema_version"} <= tables(connection)
    assert current_version(connection) == applied[-1]


def test_rerun_applies_nothing(tmp_path):
    path = tmp_path / "db.sqlite3"
    apply_migrations(connect(path))
    connection = connect(path)

    assert apply_migrations(connection) == []
    count = connection.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0]
    assert count == len(find_migrations())


def test_newer_database_rejected(tmp_path):
    connection = connect(tmp_path / "db.sqlite3")
    apply_migrations(connection)
    newest = current_version(connection)
    connection.execute(
        "INSERT INTO schema_version (version, name, applied_at) VALUES (?, 'future', 0)",
        (newest + 5,),
    )

    with pytest.raises(MigrationError, match=f"schema version {newest + 5}.*up to {newest}"):
        apply_migrations(connection)


def test_failed_migration_rolls_back(tmp_path):
    migrations = tmp_path / "migrations"
    write(migrations, "0001_first.sql", "CREATE TABLE one (x INTEGER);")
    write(
        migrations,
        "0002_broken.sql",
        "CREATE TABLE two (x INTEGER);\n"
        "INSERT INTO one VALUES (1);\n"
        "INSERT INTO missing VALUES (1);\n",
    )
    connection = connect(tmp_path / "db.sqlite3")

    with pytest.raises(MigrationError, match=r"0002_broken\.sql failed"):
        apply_migrations(connection, migrations)

    assert current_version(connection) == 1
    assert "two" not in tables(connection)
    assert connection.execute("SELECT COUNT(*) FROM one").fetchone()[0] == 0
    assert not connection.in_transaction


def test_fixed_migration_applies_after_failure(tmp_path):
    migrations = tmp_path / "migrations"
    write(migrations, "0001_first.sql", "CREATE TABLE one (x INTEGER);")
    write(migrations, "0002_broken.sql", "CREATE TABLE two (x INTEGER); SELECT * FROM nowhere;")
    connection = connect(tmp_path / "db.sqlite3")
    with pytest.raises(MigrationError):
        apply_migrations(connection, migrations)

    write(migrations, "0002_broken.sql", "CREATE TABLE two (x INTEGER);")
    assert apply_migrations(connection, migrations) == [2]
    assert "two" in tables(connection)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["0001_a.sql", "0003_c.sql"], "expected 2"),
        (["0001_a.sql", "0001_b.sql"], "expected 2"),
        (["1_a.sql"], "Invalid migration file name"),
    ],
)
def test_bad_file_names_rejected(tmp_path, names, message):
    for name in names:
        write(tmp_path / "migrations", name, "SELECT 1;")

    with pytest.raises(MigrationError, match=message):
        find_migrations(tmp_path / "migrations")


def test_trigger_stays_one_statement():
    script = """
    -- a comment
    CREATE TABLE t (x INTEGER);
    CREATE TRIGGER t_insert AFTER INSERT ON t BEGIN
        UPDATE t SET x = x + 1;
        SELECT 1;
    END;
    -- trailing comment
    """
    statements = split_statements(script)

    assert len(statements) == 2
    assert statements[1].endswith("END;")


def test_autocommit_connection_required(tmp_path):
    with pytest.raises(ValueError, match="isolation_level=None"):
        apply_migrations(sqlite3.connect(tmp_path / "db.sqlite3"))
