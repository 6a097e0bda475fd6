"""The SQLite job queue and per-guild settings, over one aiosqlite connection.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``. A committed
transaction is in the write-ahead log (in the operating system's page cache) before
``COMMIT`` returns, so an acknowledged enqueue survives the bot process being killed, even
with SIGKILL. Only an operating-system crash or power loss can lose the last transactions,
because NORMAL syncs the log to disk at checkpoints rather than at every commit. FULL would
close that gap at the cost of one fsync per job event. We accept losing the last queued
pictures after a power cut instead.

Queue order is start-time fair queuing by user. Every job gets a ``round``: a user's first
waiting job gets the round now being served, and each further job of theirs the round after
their previous one. Jobs run in ``priority DESC, round, id`` order, so users take turns, each
user's jobs run oldest first, and the waiting jobs keep their order among themselves. A new
job may still be placed ahead of some of them: a newcomer's first job joins the current round,
and a job requeued after a crash or shutdown goes first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from bot.jobs import ACTIVE_STATES, FINAL_STATES, Job, JobState, NewJob
from bot.migrations import MIGRATIONS_DIR, apply_migrations

__all__ = ["MAX_INTERRUPTIONS", "Job", "JobStore", "NewJob", "QueueFull"]

log = logging.getLogger(__name__)

# A job interrupted this many times (crash or restart while running) fails on the next one.
MAX_INTERRUPTIONS = 2
BUSY_TIMEOUT_MS = 5000

INTERRUPTED_TOO_OFTEN = (
    "This picture was interrupted {times} times because the generator crashed or the bot "
    "restarted while it was running, so it was given up. Try again, perhaps with a smaller "
    "size or fewer iterations."
)


class QueueFull(Exception):
    """An enqueue would exceed a limit; ``str(error)`` is a message for the user.

    ``limit_name`` is ``"per_user"`` or ``"queue"``; ``limit`` is the number that was reached.
    """

    def __init__(self, message: str, *, limit_name: str, limit: int) -> None:
        super().__init__(message)
        self.limit_name = limit_name
        self.limit = limit


class JobStore:
    """Persistent jobs and guild settings.

    Open it with :meth:`open`; every method is a coroutine. Methods that change several rows
    run in one ``BEGIN IMMEDIATE`` transaction, so limits hold even when several bot
    processes share the file.
    """

    def __init__(
        self, connection: aiosqlite.Connection, path: Path, clock: Callable[[], float] = time.time
    ) -> None:
        self._db: aiosqlite.Connection = connection
        self.path: Path = path
        self._clock: Callable[[], float] = clock
        # One connection serves every coroutine: the lock keeps their transactions apart.
        self._lock: asyncio.Lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        *,
        migrations_dir: Path = MIGRATIONS_DIR,
        clock: Callable[[], float] = time.time,
    ) -> JobStore:
        """Open (creating if needed) the database at ``path`` and apply pending migrations.

        Raises:
            MigrationError: the database is newer than this code, or a migration failed.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_migrate, path, migrations_dir)

        connection = await aiosqlite.connect(path, isolation_level=None)
        connection.row_factory = sqlite3.Row
        for pragma in _PRAGMAS:
            await connection.execute_fetchall(pragma)
        return cls(connection, path, clock)

    async def close(self) -> None:
        """Close the connection; the store cannot be used afterwards."""
        await self._db.close()

    # -- helpers -------------------------------------------------------------------------

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            await self._db.execute_fetchall("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute_fetchall("ROLLBACK")
                raise
            await self._db.execute_fetchall("COMMIT")

    async def _fetch_all(self, sql: str, parameters: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            rows = await self._db.execute_fetchall(sql, tuple(parameters))
            return list(rows)

    async def _fetch_one(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Row | None:
        rows = await self._fetch_all(sql, parameters)
        return rows[0] if rows else None

    async def _fetch_job(self, sql: str, parameters: Iterable[Any] = ()) -> Job | None:
        row = await self._fetch_one(sql, parameters)
        return None if row is None else _job_from_row(row)

    async def _change_job(self, sql: str, parameters: Iterable[Any]) -> Job | None:
        """Run one ``UPDATE/DELETE ... RETURNING *`` and return the changed job, if any."""
        async with self._transaction() as db:
            rows = await db.execute_fetchall(sql, tuple(parameters))
            row = rows[0] if rows else None
        return None if row is None else _job_from_row(row)

    # -- queue -----------------------------------------------------------------------------

    async def enqueue(self, new: NewJob, per_user_limit: int, queue_limit: int) -> tuple[Job, int]:
        """Add a job at its fair place in the queue; return it and its 1-based position.

        ``per_user_limit`` bounds the user's queued and running jobs in all guilds together;
        ``queue_limit`` bounds the queued jobs of everyone.

        Raises:
            QueueFull: a limit is reached. The message names the limit and what to do.
        """
        async with self._transaction() as db:
            await _check_limits(db, new.user_id, per_user_limit, queue_limit)
            job_round = await _round_for_user(db, new.user_id)
            rows = await db.execute_fetchall(
                """
                INSERT INTO jobs (guild_id, channel_id, user_id, prompt, request, round, created_at)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                RETURNING *
                """,
                (
                    new.guild_id,
                    new.channel_id,
                    new.user_id,
                    new.prompt,
                    json.dumps(new.request),
                    job_round,
                    self._clock(),
                ),
            )
            job = _job_from_row(rows[0])
            position = await _queued_position(db, job.id)
        log.info("Queued job %d for user %d at position %d", job.id, job.user_id, position)
        return job, position

    async def next_job(self) -> Job | None:
        """Mark the first job in queue order as running and return it (None if none wait)."""
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                """
                UPDATE jobs SET state = 'running', started_at = ?
                WHERE id = (
                    SELECT id FROM jobs WHERE state = 'queued'
                    ORDER BY priority DESC, round, id LIMIT 1
                )
                RETURNING *
                """,
                (self._clock(),),
            )
            row = rows[0] if rows else None
            if row is None:
                return None
            job = _job_from_row(row)

            # A requeued job may carry an old round; the served round never goes back.
            await db.execute_fetchall(
                """
                INSERT INTO meta (key, value) VALUES ('current_round', ?)
                ON CONFLICT (key) DO UPDATE
                SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))
                """,
                (job.round,),
            )
        return job

    async def get(self, job_id: int) -> Job | None:
        """Return the job with this id, or None."""
        return await self._fetch_job("SELECT * FROM jobs WHERE id = ?", (job_id,))

    async def position(self, job_id: int) -> int | None:
        """Return the job's place in the queue: 1 runs next, 0 is running, None has ended."""
        async with self._lock:
            rows = await self._db.execute_fetchall("SELECT state FROM jobs WHERE id = ?", (job_id,))
            row = rows[0] if rows else None
            if row is None or row["state"] in FINAL_STATES:
                return None
            if row["state"] == "running":
                return 0
            return await _queued_position(self._db, job_id)

    async def queue(self, limit: int = 100) -> list[Job]:
        """Return running jobs, then queued jobs in the order they will run."""
        rows = await self._fetch_all(
            """
            SELECT * FROM jobs WHERE state IN ('queued', 'running')
            ORDER BY state = 'running' DESC, priority DESC, round, id
            LIMIT ?
            """,
            (limit,),
        )
        return [_job_from_row(row) for row in rows]

    async def user_jobs(self, guild_id: int | None, user_id: int) -> list[Job]:
        """Return the user's queued and running jobs in this guild (None: direct messages)."""
        rows = await self._fetch_all(
            """
            SELECT * FROM jobs
            WHERE user_id = ? AND guild_id IS ? AND state IN ('queued', 'running')
            ORDER BY state = 'running' DESC, priority DESC, round, id
            """,
            (user_id, guild_id),
        )
        return [_job_from_row(row) for row in rows]

    async def latest_active(self, guild_id: int | None, user_id: int) -> Job | None:
        """Return the user's most recently created queued or running job in this guild."""
        return await self._fetch_job(
            """
            SELECT * FROM jobs
            WHERE user_id = ? AND guild_id IS ? AND state IN ('queued', 'running')
            ORDER BY id DESC LIMIT 1
            """,
            (user_id, guild_id),
        )

    async def queue_length(self) -> int:
        """Return the number of queued jobs (running ones not counted)."""
        row = await self._fetch_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        return row[0]

    async def set_message(self, job_id: int, channel_id: int, message_id: int) -> None:
        """Record the Discord message that shows the job."""
        async with self._transaction() as db:
            await db.execute_fetchall(
                "UPDATE jobs SET channel_id = ?, message_id = ? WHERE id = ?",
                (channel_id, message_id, job_id),
            )

    # -- cancel and delete (ownership in the WHERE clause) ----------------------------------

    async def cancel(
        self, job_id: int, user_id: int, *, admin: bool, guild_id: int | None
    ) -> Job | None:
        """Cancel a queued or running job of ``user_id`` (any user's if ``admin``).

        The job must belong to ``guild_id`` (None: direct messages). Returns the cancelled
        job, or None if no such active job exists for this caller. For a job that was
        running (``started_at`` is set), the caller must also call ``Executor.cancel``.
        """
        job = await self._change_job(
            """
            UPDATE jobs SET state = 'cancelled', finished_at = ?
            WHERE id = ? AND (user_id = ? OR ?) AND guild_id IS ?
              AND state IN ('queued', 'running')
            RETURNING *
            """,
            (self._clock(), job_id, user_id, admin, guild_id),
        )
        if job is not None:
            log.info("Job %d cancelled by user %d (admin=%s)", job_id, user_id, admin)
        return job

    async def delete(
        self, job_id: int, user_id: int, *, admin: bool, guild_id: int | None
    ) -> Job | None:
        """Delete a finished (done, failed or cancelled) job and its result file.

        Same ownership rules as :meth:`cancel`. Queued and running jobs are not deleted (cancel
        them first); the result is None for them as for someone else's job.
        """
        job = await self._change_job(
            """
            DELETE FROM jobs
            WHERE id = ? AND (user_id = ? OR ?) AND guild_id IS ?
              AND state IN ('done', 'failed', 'cancelled')
            RETURNING *
            """,
            (job_id, user_id, admin, guild_id),
        )
        if job is not None:
            if job.result_path:
                await asyncio.to_thread(_remove_file, job.result_path)
            log.info("Job %d deleted by user %d (admin=%s)", job_id, user_id, admin)
        return job

    # -- state changes made by the executor --------------------------------------------------

    async def mark_done(self, job_id: int, result_path: str | None) -> Job | None:
        """Mark a running job done; None if it is no longer running (e.g. cancelled).

        The job counts as undelivered until :meth:`mark_delivered`.
        """
        return await self._change_job(
            """
            UPDATE jobs SET state = 'done', finished_at = ?, result_path = ?,
                            state_path = NULL, delivered_at = NULL, done_message_id = message_id
            WHERE id = ? AND state = 'running'
            RETURNING *
            """,
            (self._clock(), result_path, job_id),
        )

    async def mark_delivered(self, job_id: int) -> None:
        """Record that a done job's picture was handed to the Discord layer."""
        async with self._transaction() as db:
            await db.execute_fetchall(
                "UPDATE jobs SET delivered_at = ? WHERE id = ? AND state = 'done'",
                (self._clock(), job_id),
            )

    async def undelivered(self) -> list[Job]:
        """Return the done jobs whose picture a previous run did not post, oldest first.

        A job whose message changed since it was marked done had its picture posted (the
        post records the new message) and is marked delivered here instead of returned.

        NOTE: a crash after Discord accepted the picture but before the new message id was
        committed (milliseconds) makes the picture count as not posted, so it is posted twice.
        """
        async with self._transaction() as db:
            await db.execute_fetchall(
                """
                UPDATE jobs SET delivered_at = ?
                WHERE state = 'done' AND delivered_at IS NULL
                  AND message_id IS NOT done_message_id
                """,
                (self._clock(),),
            )
            rows = await db.execute_fetchall(
                "SELECT * FROM jobs WHERE state = 'done' AND delivered_at IS NULL ORDER BY id"
            )
        return [_job_from_row(row) for row in rows]

    async def mark_failed(self, job_id: int, error: str) -> Job | None:
        """Mark a running job failed with a user-facing ``error``; None if not running."""
        return await self._change_job(
            """
            UPDATE jobs SET state = 'failed', finished_at = ?, error = ?, state_path = NULL
            WHERE id = ? AND state = 'running'
            RETURNING *
            """,
            (self._clock(), error, job_id),
        )

    async def mark_cancelled(self, job_id: int) -> Job | None:
        """Mark a running job cancelled; return it (also if it was already cancelled)."""
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                """
                UPDATE jobs SET state = 'cancelled', finished_at = COALESCE(finished_at, ?),
                                state_path = NULL
                WHERE id = ? AND state IN ('running', 'cancelled')
                RETURNING *
                """,
                (self._clock(), job_id),
            )
            row = rows[0] if rows else None
        return None if row is None else _job_from_row(row)

    async def save_progress(self, job_id: int, iteration: int, state_path: str) -> None:
        """Record that the running job's state at ``iteration`` is saved in ``state_path``."""
        async with self._transaction() as db:
            await db.execute_fetchall(
                "UPDATE jobs SET saved_iteration = ?, state_path = ? WHERE id = ?",
                (iteration, state_path, job_id),
            )

    async def requeue(self, job_id: int) -> Job | None:
        """Put a running job back at the front of the queue without counting an interruption.

        Used when the bot shuts down gracefully. Returns None if the job was not running.
        """
        return await self._change_job(
            """
            UPDATE jobs SET state = 'queued', priority = 1, started_at = NULL
            WHERE id = ? AND state = 'running'
            RETURNING *
            """,
            (job_id,),
        )

    async def interrupt(self, job_id: int) -> Job | None:
        """Handle a running job whose generator died: requeue it at the front, or fail it.

        The job fails once it has been interrupted more than ``MAX_INTERRUPTIONS`` times.
        Returns the job in its new state (``queued`` or ``failed``), None if it was not running.
        """
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                _INTERRUPT_SQL + " WHERE id = ? AND state = 'running' RETURNING *",
                (*self._interrupt_parameters(), job_id),
            )
            row = rows[0] if rows else None
        return None if row is None else _job_from_row(row)

    async def recover(self) -> list[Job]:
        """Requeue (or fail, see :meth:`interrupt`) every job left running by a previous run.

        Call once at start-up before the executor takes jobs. Returns the affected jobs in
        their new state, so the Discord layer can post a notice in their channels.
        """
        async with self._transaction() as db:
            rows = await db.execute_fetchall(
                _INTERRUPT_SQL + " WHERE state = 'running' RETURNING *",
                self._interrupt_parameters(),
            )
        jobs = sorted((_job_from_row(row) for row in rows), key=lambda job: job.id)
        for job in jobs:
            log.warning("Job %d was running at the last shutdown: now %s", job.id, job.state)
        return jobs

    def _interrupt_parameters(self) -> tuple[Any, ...]:
        now = self._clock()
        message = INTERRUPTED_TOO_OFTEN.format(times=MAX_INTERRUPTIONS + 1)
        return (MAX_INTERRUPTIONS, MAX_INTERRUPTIONS, message, MAX_INTERRUPTIONS, now)

    async def job_ids(self, states: Iterable[JobState]) -> set[int]:
        """Return the ids of the jobs in any of ``states``."""
        states = tuple(states)
        placeholders = ", ".join("?" for _ in states)
        rows = await self._fetch_all(
            f"SELECT id FROM jobs WHERE state IN ({placeholders})",  # only '?' marks
            states,
        )
        return {row[0] for row in rows}

    async def start_image_in_use(self, path: str) -> bool:
        """Return whether a stored job, in any state, starts from the image at ``path``."""
        row = await self._fetch_one(
            "SELECT 1 FROM jobs WHERE json_extract(request, '$.init_image') = ? LIMIT 1",
            (path,),
        )
        return row is not None

    async def start_images_in_use(self) -> set[str]:
        """Return the start image paths that stored jobs name."""
        rows = await self._fetch_all(
            "SELECT DISTINCT json_extract(request, '$.init_image') FROM jobs "
            "WHERE json_extract(request, '$.init_image') IS NOT NULL"
        )
        return {row[0] for row in rows}

    # -- guild settings and counters ------------------------------------------------------

    async def guild_settings(self, guild_id: int) -> dict[str, Any]:
        """Return the settings this guild changed, as key -> value (defaults not included)."""
        rows = await self._fetch_all(
            "SELECT key, value FROM guild_settings WHERE guild_id = ?", (guild_id,)
        )
        return {row["key"]: json.loads(row["value"]) for row in rows}

    async def set_guild_setting(self, guild_id: int, key: str, value: Any) -> Any:
        """Store a JSON-serialisable ``value``; return the previous one (None if unset)."""
        async with self._transaction() as db:
            old = await _guild_value(db, guild_id, key)
            await db.execute_fetchall(
                """
                INSERT INTO guild_settings (guild_id, key, value) VALUES (?, ?, ?)
                ON CONFLICT (guild_id, key) DO UPDATE SET value = excluded.value
                """,
                (guild_id, key, json.dumps(value)),
            )
        return old

    async def reset_guild_setting(self, guild_id: int, key: str) -> Any:
        """Remove a guild's value for ``key``; return the previous one (None if unset)."""
        async with self._transaction() as db:
            old = await _guild_value(db, guild_id, key)
            await db.execute_fetchall(
                "DELETE FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, key)
            )
        return old

    async def get_meta(self, key: str, default: Any = None) -> Any:
        """Return a value stored with :meth:`set_meta`."""
        row = await self._fetch_one("SELECT value FROM meta WHERE key = ?", (key,))
        return default if row is None else json.loads(row["value"])

    async def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        async with self._transaction() as db:
            await db.execute_fetchall(
                """
                INSERT INTO meta (key, value) VALUES (?, ?)
                ON CONFLICT (key) DO UPDATE SET value = excluded.value
                """,
                (key, json.dumps(value)),
            )

    async def stats(self) -> dict[str, int]:
        """Return the number of jobs in each state, plus ``total``."""
        rows = await self._fetch_all("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        counts = dict.fromkeys((*ACTIVE_STATES, *FINAL_STATES), 0)
        counts.update({row[0]: row[1] for row in rows})
        counts["total"] = sum(counts.values())
        return counts


_PRAGMAS = (
    "PRAGMA journal_mode = WAL",
    # See the module docstring: survives process crashes, not power loss.
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
)

# SET expressions see the row as it was before the update, so `attempts` below is the old count.
_INTERRUPT_SQL = """
    UPDATE jobs SET
        state = CASE WHEN attempts >= ? THEN 'failed' ELSE 'queued' END,
        error = CASE WHEN attempts >= ? THEN ? ELSE error END,
        finished_at = CASE WHEN attempts >= ? THEN ? ELSE NULL END,
        started_at = NULL,
        priority = 1,
        attempts = attempts + 1
"""


def _migrate(path: Path, migrations_dir: Path) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        apply_migrations(connection, migrations_dir)
    finally:
        connection.close()


async def _scalar(db: aiosqlite.Connection, sql: str, parameters: tuple[Any, ...] = ()) -> Any:
    rows = await db.execute_fetchall(sql, parameters)
    row = rows[0] if rows else None
    return None if row is None else row[0]


async def _check_limits(
    db: aiosqlite.Connection, user_id: int, per_user_limit: int, queue_limit: int
) -> None:
    active = await _scalar(
        db,
        "SELECT COUNT(*) FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')",
        (user_id,),
    )
    if active >= per_user_limit:
        raise QueueFull(
            f"You already have {active} picture{'s' if active != 1 else ''} queued or running, "
            f"and the limit is {per_user_limit} per person. Wait for one to finish, or cancel "
            "one with /cancel.",
            limit_name="per_user",
            limit=per_user_limit,
        )

    queued = await _scalar(db, "SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
    if queued >= queue_limit:
        raise QueueFull(
            f"The queue is full: {queued} pictures are waiting, the most this bot accepts "
            f"is {queue_limit}. Try again in a few minutes.",
            limit_name="queue",
            limit=queue_limit,
        )


async def _round_for_user(db: aiosqlite.Connection, user_id: int) -> int:
    """Return the fair-queue round for the user's next job (see the module docstring)."""
    current = await _scalar(
        db, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'current_round'"
    )
    last = await _scalar(
        db,
        "SELECT MAX(round) FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')",
        (user_id,),
    )
    current = current or 0
    return current if last is None else max(current, last + 1)


async def _queued_position(db: aiosqlite.Connection, job_id: int) -> int:
    # Jobs at or before this one in `priority DESC, round, id` order, itself included.
    return await _scalar(
        db,
        """
        SELECT COUNT(*) FROM jobs AS other, jobs AS job
        WHERE job.id = ? AND other.state = 'queued'
          AND (-other.priority, other.round, other.id) <= (-job.priority, job.round, job.id)
        """,
        (job_id,),
    )


async def _guild_value(db: aiosqlite.Connection, guild_id: int, key: str) -> Any:
    value = await _scalar(
        db, "SELECT value FROM guild_settings WHERE guild_id = ? AND key = ?", (guild_id, key)
    )
    return None if value is None else json.loads(value)


def _remove_file(path: str) -> None:
    Path(path).unlink(missing_ok=True)


_JOB_FIELDS = frozenset(field.name for field in dataclasses.fields(Job))


def _job_from_row(row: sqlite3.Row) -> Job:
    # Bookkeeping columns such as delivered_at stay in the database.
    values = {key: value for key, value in dict(row).items() if key in _JOB_FIELDS}
    values["request"] = json.loads(values["request"])
    return Job(**values)
