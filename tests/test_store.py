import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from bot.migrations import MigrationError
from bot.store import MAX_INTERRUPTIONS, JobStore, NewJob, QueueFull

GUILD = 100
OTHER_GUILD = 200
REPOSITORY = Path(__file__).resolve().parent.parent
REQUEST = {"prompts": [{"text": "a lighthouse", "weight": 1.0, "stop": None}], "seed": 1}


def new_job(user_id: int = 1, guild_id: int | None = GUILD, prompt: str = "a lighthouse") -> NewJob:
    return NewJob(guild_id=guild_id, channel_id=10, user_id=user_id, prompt=prompt, request=REQUEST)


@pytest.fixture
async def store(tmp_path):
    store = await JobStore.open(tmp_path / "imagine.sqlite3")
    yield store
    await store.close()


async def test_enqueue_returns_job_and_position(store):
    first, first_position = await store.enqueue(new_job(1), 5, 100)
    _, second_position = await store.enqueue(new_job(2), 5, 100)

    assert (first_position, second_position) == (1, 2)
    assert first.state == "queued"
    assert first.request == REQUEST
    assert first.prompt == "a lighthouse"
    assert first.guild_id == GUILD
    assert first.attempts == 0
    assert await store.get(first.id) == first
    assert await store.queue_length() == 2


async def test_pragmas_set(store, tmp_path):
    async with store._lock:
        cursor = await store._db.execute("PRAGMA journal_mode")
        assert (await cursor.fetchone())[0] == "wal"
        cursor = await store._db.execute("PRAGMA synchronous")
        assert (await cursor.fetchone())[0] == 1  # NORMAL
        cursor = await store._db.execute("PRAGMA foreign_keys")
        assert (await cursor.fetchone())[0] == 1
        cursor = await store._db.execute("PRAGMA busy_timeout")
        assert (await cursor.fetchone())[0] > 0


async def test_per_user_limit(store):
    for _ in range(3):
        await store.enqueue(new_job(1), 3, 100)

    with pytest.raises(QueueFull) as raised:
        await store.enqueue(new_job(1), 3, 100)

    assert raised.value.limit_name == "per_user"
    assert raised.value.limit == 3
    assert "3 pictures queued or running" in str(raised.value)
    assert "/cancel" in str(raised.value)
    await store.enqueue(new_job(2), 3, 100)


async def test_per_user_limit_counts_running(store):
    await store.enqueue(new_job(1), 2, 100)
    await store.next_job()
    await store.enqueue(new_job(1), 2, 100)

    with pytest.raises(QueueFull):
        await store.enqueue(new_job(1), 2, 100)


async def test_finished_jobs_free_the_limit(store):
    job, _ = await store.enqueue(new_job(1), 1, 100)
    await store.cancel(job.id, 1, admin=False, guild_id=GUILD)

    await store.enqueue(new_job(1), 1, 100)


async def test_queue_limit(store):
    for user in range(4):
        await store.enqueue(new_job(user), 10, 4)

    with pytest.raises(QueueFull) as raised:
        await store.enqueue(new_job(99), 10, 4)

    assert raised.value.limit_name == "queue"
    assert "queue is full" in str(raised.value)
    assert "4" in str(raised.value)


async def test_concurrent_enqueues_respect_limits(store):
    results = await asyncio.gather(
        *(store.enqueue(new_job(1), 5, 100) for _ in range(20)), return_exceptions=True
    )

    accepted = [r for r in results if not isinstance(r, BaseException)]
    rejected = [r for r in results if isinstance(r, QueueFull)]
    assert len(accepted) == 5
    assert len(rejected) == 15
    assert sorted(position for _, position in accepted) == [1, 2, 3, 4, 5]
    assert await store.queue_length() == 5


async def test_two_connections_respect_queue_limit(tmp_path):
    path = tmp_path / "imagine.sqlite3"
    first = await JobStore.open(path)
    second = await JobStore.open(path)
    try:
        results = await asyncio.gather(
            *(s.enqueue(new_job(user), 10, 6) for user in range(10) for s in (first, second)),
            return_exceptions=True,
        )
        assert sum(not isinstance(r, BaseException) for r in results) == 6
        assert all(isinstance(r, QueueFull) for r in results if isinstance(r, BaseException))
        assert await first.queue_length() == 6
    finally:
        await first.close()
        await second.close()


async def test_cancel_own_queued_job(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)

    cancelled = await store.cancel(job.id, 1, admin=False, guild_id=GUILD)

    assert cancelled is not None
    assert cancelled.state == "cancelled"
    assert cancelled.started_at is None
    assert cancelled.finished_at is not None
    assert await store.position(job.id) is None
    assert await store.cancel(job.id, 1, admin=False, guild_id=GUILD) is None


async def test_cancel_running_job(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.next_job()

    cancelled = await store.cancel(job.id, 1, admin=False, guild_id=GUILD)

    assert cancelled.state == "cancelled"
    assert cancelled.started_at is not None
    assert await store.mark_done(job.id, None) is None


async def test_cancel_others_job_refused(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)

    assert await store.cancel(job.id, 2, admin=False, guild_id=GUILD) is None
    assert (await store.get(job.id)).state == "queued"


async def test_admin_cancels_others_job(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)

    cancelled = await store.cancel(job.id, 2, admin=True, guild_id=GUILD)

    assert cancelled is not None
    assert cancelled.state == "cancelled"


async def test_cancel_from_other_guild_refused(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)

    assert await store.cancel(job.id, 1, admin=False, guild_id=OTHER_GUILD) is None
    assert await store.cancel(job.id, 2, admin=True, guild_id=OTHER_GUILD) is None
    assert await store.cancel(job.id, 1, admin=False, guild_id=None) is None
    assert (await store.get(job.id)).state == "queued"


async def test_cancel_direct_message_job(store):
    job, _ = await store.enqueue(new_job(1, guild_id=None), 5, 100)

    assert await store.cancel(job.id, 1, admin=False, guild_id=GUILD) is None
    assert (await store.cancel(job.id, 1, admin=False, guild_id=None)).state == "cancelled"


async def test_delete_finished_job(store, tmp_path):
    result = tmp_path / "job.png"
    result.write_bytes(b"png")
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.next_job()
    await store.mark_done(job.id, str(result))

    assert await store.delete(job.id, 2, admin=False, guild_id=GUILD) is None
    assert await store.delete(job.id, 1, admin=False, guild_id=OTHER_GUILD) is None
    deleted = await store.delete(job.id, 1, admin=False, guild_id=GUILD)

    assert deleted.id == job.id
    assert await store.get(job.id) is None
    assert not result.exists()


async def test_admin_deletes_others_job(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.cancel(job.id, 1, admin=False, guild_id=GUILD)

    assert await store.delete(job.id, 2, admin=True, guild_id=GUILD) is not None


async def test_delete_active_job_refused(store):
    queued, _ = await store.enqueue(new_job(1), 5, 100)

    assert await store.delete(queued.id, 1, admin=True, guild_id=GUILD) is None
    assert (await store.get(queued.id)).state == "queued"


async def test_user_jobs_and_latest_active(store):
    first, _ = await store.enqueue(new_job(1), 5, 100)
    second, _ = await store.enqueue(new_job(1), 5, 100)
    await store.enqueue(new_job(1, guild_id=OTHER_GUILD), 5, 100)
    await store.enqueue(new_job(2), 5, 100)
    await store.next_job()

    jobs = await store.user_jobs(GUILD, 1)

    assert [job.id for job in jobs] == [first.id, second.id]
    assert jobs[0].state == "running"
    assert (await store.latest_active(GUILD, 1)).id == second.id
    assert await store.latest_active(GUILD, 3) is None


async def test_set_message(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)

    await store.set_message(job.id, 11, 12345)

    stored = await store.get(job.id)
    assert (stored.channel_id, stored.message_id) == (11, 12345)


async def test_recovery_requeues_running_job_first(store):
    running, _ = await store.enqueue(new_job(1), 5, 100)
    waiting, _ = await store.enqueue(new_job(2), 5, 100)
    await store.next_job()

    recovered = await store.recover()

    assert [job.id for job in recovered] == [running.id]
    assert recovered[0].state == "queued"
    assert recovered[0].attempts == 1
    assert recovered[0].priority == 1
    assert await store.position(running.id) == 1
    assert await store.position(waiting.id) == 2
    assert (await store.next_job()).id == running.id


async def test_recovery_fails_job_after_repeated_interruptions(store):
    await store.enqueue(new_job(1), 5, 100)
    for attempt in range(1, MAX_INTERRUPTIONS + 1):
        await store.next_job()
        recovered = await store.recover()
        assert recovered[0].state == "queued"
        assert recovered[0].attempts == attempt

    await store.next_job()
    recovered = await store.recover()

    assert recovered[0].state == "failed"
    assert "interrupted 3 times" in recovered[0].error
    assert recovered[0].finished_at is not None
    assert await store.next_job() is None


async def test_recovery_without_running_jobs(store):
    await store.enqueue(new_job(1), 5, 100)

    assert await store.recover() == []


async def test_interrupt_and_requeue(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.next_job()

    requeued = await store.requeue(job.id)
    assert (requeued.state, requeued.attempts, requeued.priority) == ("queued", 0, 1)

    await store.next_job()
    interrupted = await store.interrupt(job.id)
    assert (interrupted.state, interrupted.attempts) == ("queued", 1)
    assert await store.interrupt(job.id) is None


async def test_save_progress_and_finish(store):
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.next_job()

    await store.save_progress(job.id, 20, "/tmp/state.pt")
    saved = await store.get(job.id)
    failed = await store.mark_failed(job.id, "Out of memory.")

    assert (saved.saved_iteration, saved.state_path) == (20, "/tmp/state.pt")
    assert failed.state == "failed"
    assert failed.error == "Out of memory."
    assert failed.state_path is None


async def test_guild_settings_round_trip(store):
    assert await store.guild_settings(GUILD) == {}

    assert await store.set_guild_setting(GUILD, "default_size", 256) is None
    assert await store.set_guild_setting(GUILD, "default_size", 128) == 256
    await store.set_guild_setting(GUILD, "banned_words", ["gore", "blood"])
    await store.set_guild_setting(OTHER_GUILD, "default_size", 64)

    assert await store.guild_settings(GUILD) == {
        "default_size": 128,
        "banned_words": ["gore", "blood"],
    }
    assert await store.reset_guild_setting(GUILD, "default_size") == 128
    assert await store.reset_guild_setting(GUILD, "default_size") is None
    assert await store.guild_settings(GUILD) == {"banned_words": ["gore", "blood"]}


async def test_stats(store):
    done, _ = await store.enqueue(new_job(1), 5, 100)
    await store.enqueue(new_job(2), 5, 100)
    await store.next_job()
    await store.mark_done(done.id, None)

    stats = await store.stats()

    assert stats["done"] == 1
    assert stats["queued"] == 1
    assert stats["running"] == 0
    assert stats["total"] == 2


async def test_meta_round_trip(store):
    assert await store.get_meta("iterations_per_s", 0.0) == 0.0
    await store.set_meta("iterations_per_s", 1.5)
    assert await store.get_meta("iterations_per_s") == 1.5


async def test_newer_database_refused_at_open(tmp_path):
    path = tmp_path / "imagine.sqlite3"
    store = await JobStore.open(path)
    await store.close()
    migrations = tmp_path / "old-migrations"
    migrations.mkdir()

    with pytest.raises(MigrationError, match="newer imagine"):
        await JobStore.open(path, migrations_dir=migrations)


ENQUEUE_THEN_WAIT = textwrap.dedent(
    """
    import asyncio, sys, time
    from bot.store import JobStore, NewJob

    async def main():
        store = await JobStore.open(sys.argv[1])
        job, _ = await store.enqueue(NewJob(1, 10, 7, "kept", {"seed": 1}), 5, 100)
        print(job.id, flush=True)
        time.sleep(60)

    asyncio.run(main())
    """
)


async def test_enqueue_survives_sigkill(tmp_path):
    path = tmp_path / "imagine.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        ENQUEUE_THEN_WAIT,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPOSITORY,
    )
    try:
        job_id = int(await asyncio.wait_for(process.stdout.readline(), 60))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        await process.wait()

    store = await JobStore.open(path)
    try:
        job = await store.get(job_id)
        assert job is not None
        assert (job.prompt, job.state) == ("kept", "queued")
    finally:
        await store.close()


async def test_recovery_with_cursors_kept_alive(tmp_path, monkeypatch):
    # Something that keeps cursors referenced (a debugger, a test harness) must not leave
    # statements active, or COMMIT fails with "SQL statements in progress".
    import aiosqlite

    kept = []
    execute = aiosqlite.Connection.execute

    async def execute_and_keep(self, *args, **kwargs):
        cursor = await execute(self, *args, **kwargs)
        kept.append(cursor)
        return cursor

    monkeypatch.setattr(aiosqlite.Connection, "execute", execute_and_keep)
    path = tmp_path / "imagine.sqlite3"
    store = await JobStore.open(path)
    job, _ = await store.enqueue(new_job(1), 5, 100)
    await store.next_job()
    await store.close()

    store = await JobStore.open(path)
    try:
        recovered = await store.recover()
    finally:
        await store.close()

    assert [j.id for j in recovered] == [job.id]
