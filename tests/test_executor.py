"""The executor end to end: the real worker process running the generator on tiny models."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.executor import Executor, ModelsUnavailable
from bot.jobs import Job
from bot.settings import Settings
from bot.store import JobStore, NewJob
from generator import GenerationRequest, Prompt
from generator.png import read_png_metadata
from generator.testing import TinyModels, build_tiny_models

REPOSITORY = Path(__file__).resolve().parent.parent
GUILD = 1
# Tiny models run about 35 iterations/s at 32x32 on one thread (measured on a 2-core VM), so
# a LONG job runs for over a minute. The tests that use it cancel or kill it within seconds.
LONG = 3000


@dataclass
class Event:
    kind: str
    job_id: int
    data: dict[str, Any] = field(default_factory=dict)


class RecordingEvents:
    """JobEvents that records every call, standing in for the Discord layer."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def job_started(self, job: Job, resumed_at: int | None) -> None:
        self.events.append(Event("started", job.id, {"resumed_at": resumed_at}))

    async def job_progress(self, job: Job, iteration: int, total: int, png: bytes | None) -> None:
        data = {"iteration": iteration, "total": total, "png": png}
        self.events.append(Event("progress", job.id, data))

    async def job_finished(self, job: Job, png: bytes, duration_s: float) -> None:
        data = {"png": png, "duration_s": duration_s, "state": job.state}
        self.events.append(Event("finished", job.id, data))

    async def job_failed(self, job: Job, message: str) -> None:
        self.events.append(Event("failed", job.id, {"message": message, "state": job.state}))

    async def job_cancelled(self, job: Job) -> None:
        self.events.append(Event("cancelled", job.id, {"state": job.state}))

    def of(self, job_id: int, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.job_id == job_id and kind in (None, e.kind)]

    def kinds(self, job_id: int) -> list[str]:
        return [e.kind for e in self.of(job_id)]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(
                    f"timed out; events so far: {[(e.kind, e.job_id) for e in self.events]}"
                )
            await asyncio.sleep(0.02)

    async def wait_final(self, job_id: int, timeout: float = 120.0) -> Event:
        final = ("finished", "failed", "cancelled")
        await self.wait_for(lambda: any(e.kind in final for e in self.of(job_id)), timeout)
        return next(e for e in self.of(job_id) if e.kind in final)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def settings(tmp_path, tiny_models) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        device="cpu",
        vqgan_model=tiny_models.vqgan,
        clip_models=(tiny_models.clip,),
        threads=1,
    )


@pytest.fixture
async def store(settings):
    store = await JobStore.open(settings.database_path)
    yield store
    await store.close()


@pytest.fixture
async def running(store, settings):
    """An executor over the store, started, with recording events; stopped afterwards."""
    events = RecordingEvents()
    executor = Executor(store, settings, events)
    await executor.start()
    yield executor, events
    await executor.stop(timeout=20)


def request(tiny: TinyModels, iterations: int = 6, progress_every: int = 2, **changes) -> dict:
    values = dict(
        prompts=[Prompt("a red circle")],
        seed=7,
        width=32,
        height=32,
        iterations=iterations,
        cutn=2,
        vqgan=tiny.vqgan,
        clip=(tiny.clip,),
        progress_every=progress_every,
    )
    values.update(changes)
    return GenerationRequest(**values).to_dict()


async def enqueue(store: JobStore, executor: Executor, request_dict: dict, user: int = 1) -> Job:
    new = NewJob(GUILD, 10, user, "a red circle", request_dict)
    job, _ = await store.enqueue(new, per_user_limit=10, queue_limit=100)
    executor.wake()
    return job


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_jobs_complete_with_events_in_order(running, store, tiny_models):
    executor, events = running
    first = await enqueue(store, executor, request(tiny_models), user=1)
    second = await enqueue(store, executor, request(tiny_models, seed=8), user=2)
    pid = executor.info().worker_pid

    finished = await events.wait_final(first.id)
    await events.wait_final(second.id)

    kinds = events.kinds(first.id)
    assert kinds[0] == "started"
    assert kinds[-1] == "finished"
    assert set(kinds[1:-1]) == {"progress"}
    assert events.of(first.id, "started")[0].data["resumed_at"] is None

    progress = events.of(first.id, "progress")
    iterations = [e.data["iteration"] for e in progress]
    assert iterations == sorted(iterations)
    assert iterations[-1] == 6
    pictures = [e.data["png"] for e in progress if e.data["png"] is not None]
    assert len(pictures) == 3  # iterations 2, 4 and 6
    for png in pictures:
        assert open_png(png).size == (32, 32)

    image = open_png(finished.data["png"])
    assert image.size == (32, 32)
    assert image.mode == "RGB"
    assert read_png_metadata(finished.data["png"])["prompt"] == "a red circle"
    assert finished.data["state"] == "done"
    assert finished.data["duration_s"] > 0

    stored = await store.get(first.id)
    assert stored.state == "done"
    assert await asyncio.to_thread(Path(stored.result_path).read_bytes) == finished.data["png"]
    assert not (executor.state_dir / f"job-{first.id}.pt").exists()
    assert events.kinds(second.id)[-1] == "finished"

    info = executor.info()
    assert info.worker_pid == pid  # one warm worker served both jobs
    assert info.worker_restarts == 0
    assert info.device == "cpu"
    assert info.is_cpu
    assert info.models_loaded
    assert info.busy_job_id is None
    assert info.iterations_per_s > 0
    assert await store.get_meta("iterations_per_s") == info.iterations_per_s


async def test_failing_jobs_do_not_stop_queue(running, store, tiny_models):
    executor, events = running
    broken = request(tiny_models)
    broken["prompts"][0]["weight"] = [1]  # a corrupt row: float([1]) raises TypeError
    crashing = await enqueue(store, executor, broken, user=1)
    invalid = await enqueue(
        store, executor, request(tiny_models, init_image="/nonexistent/init.png"), user=2
    )
    healthy = await enqueue(store, executor, request(tiny_models), user=3)

    crash_event = await events.wait_final(crashing.id)
    invalid_event = await events.wait_final(invalid.id)
    healthy_event = await events.wait_final(healthy.id)

    assert crash_event.kind == "failed"
    assert f"job {crashing.id}" in crash_event.data["message"]
    assert "log" in crash_event.data["message"]
    assert invalid_event.kind == "failed"
    assert "/nonexistent/init.png" in invalid_event.data["message"]
    assert "not found" in invalid_event.data["message"]
    assert (await store.get(invalid.id)).error == invalid_event.data["message"]
    assert healthy_event.kind == "finished"
    assert executor.info().worker_restarts == 0


async def test_cancel_running_job(running, store, tiny_models):
    executor, events = running
    long_job = await enqueue(store, executor, request(tiny_models, iterations=LONG))
    after = await enqueue(store, executor, request(tiny_models), user=2)
    await events.wait_for(lambda: len(events.of(long_job.id, "progress")) >= 2)

    running_eta = await executor.eta_seconds(long_job.id)
    waiting_eta = await executor.eta_seconds(after.id)
    cancelled = await store.cancel(long_job.id, 1, admin=False, guild_id=GUILD)
    requested = time.monotonic()
    assert await executor.cancel(long_job.id)
    final = await events.wait_final(long_job.id)

    assert 0 < running_eta < waiting_eta
    assert cancelled.started_at is not None
    assert final.kind == "cancelled"
    assert time.monotonic() - requested < 5
    last_iteration = events.of(long_job.id, "progress")[-1].data["iteration"]
    assert last_iteration < LONG
    assert (await store.get(long_job.id)).state == "cancelled"
    assert (await events.wait_final(after.id)).kind == "finished"
    assert not await executor.cancel(long_job.id)


async def test_cancel_through_store_only(running, store, tiny_models):
    executor, events = running
    long_job = await enqueue(store, executor, request(tiny_models, iterations=LONG))
    await events.wait_for(lambda: events.of(long_job.id, "progress"))

    await store.cancel(long_job.id, 1, admin=False, guild_id=GUILD)

    assert (await events.wait_final(long_job.id, timeout=30)).kind == "cancelled"
    assert executor.info().busy_job_id is None


async def wait_saved_state(store: JobStore, job_id: int) -> int:
    deadline = time.monotonic() + 120
    while (saved := (await store.get(job_id)).saved_iteration) is None:
        assert time.monotonic() < deadline, "no state was saved"
        await asyncio.sleep(0.02)
    return saved


async def test_worker_killed_mid_job(running, store, tiny_models):
    executor, events = running
    job = await enqueue(store, executor, request(tiny_models, iterations=120, progress_every=20))
    after = await enqueue(store, executor, request(tiny_models), user=2)
    await wait_saved_state(store, job.id)
    killed_pid = executor.info().worker_pid

    os.kill(killed_pid, signal.SIGKILL)
    final = await events.wait_final(job.id)
    await events.wait_final(after.id)

    assert final.kind == "finished"
    starts = events.of(job.id, "started")
    assert len(starts) == 2
    resumed_at = starts[1].data["resumed_at"]
    assert resumed_at is not None
    assert resumed_at % 20 == 0
    stored = await store.get(job.id)
    assert stored.state == "done"
    assert stored.attempts == 1
    assert events.kinds(after.id)[-1] == "finished"
    info = executor.info()
    assert info.worker_restarts == 1
    assert info.worker_pid not in (None, killed_pid)


async def test_resumed_job_matches_uninterrupted(running, store, tiny_models):
    executor, events = running
    job_request = request(tiny_models, iterations=80, progress_every=10, seed=11)
    uninterrupted = await enqueue(store, executor, job_request, user=1)
    expected = (await events.wait_final(uninterrupted.id)).data["png"]

    interrupted = await enqueue(store, executor, job_request, user=2)
    saved = await wait_saved_state(store, interrupted.id)
    os.kill(executor.info().worker_pid, signal.SIGKILL)
    final = await events.wait_final(interrupted.id)

    assert final.kind == "finished"
    resumed_at = [e.data["resumed_at"] for e in events.of(interrupted.id, "started")]
    assert resumed_at[0] is None
    assert resumed_at[1] is not None
    assert resumed_at[1] >= saved
    assert resumed_at[1] < 80  # the kill came before the end, so iterations were redone
    assert open_png(final.data["png"]).tobytes() == open_png(expected).tobytes()
    assert final.data["png"] == expected


async def test_worker_killed_too_often_fails_job(running, store, tiny_models):
    executor, events = running
    job = await enqueue(store, executor, request(tiny_models, iterations=LONG, progress_every=20))
    after = await enqueue(store, executor, request(tiny_models), user=2)
    await wait_saved_state(store, job.id)
    # As if this were the third crash of the job.
    async with store._lock:
        await store._db.execute("UPDATE jobs SET attempts = 2 WHERE id = ?", (job.id,))

    os.kill(executor.info().worker_pid, signal.SIGKILL)
    final = await events.wait_final(job.id)

    assert final.kind == "failed"
    assert "interrupted 3 times" in final.data["message"]
    assert (await store.get(job.id)).state == "failed"
    assert not (executor.state_dir / f"job-{job.id}.pt").exists()
    assert (await events.wait_final(after.id)).kind == "finished"


async def test_stop_requeues_and_restart_resumes(store, settings, tiny_models):
    events = RecordingEvents()
    executor = Executor(store, settings, events)
    await executor.start()
    job = await enqueue(store, executor, request(tiny_models, iterations=120, progress_every=20))
    saved = await wait_saved_state(store, job.id)

    started = time.monotonic()
    await executor.stop(timeout=20)

    assert time.monotonic() - started < 20
    stopped = await store.get(job.id)
    assert stopped.state == "queued"
    assert stopped.priority == 1
    assert stopped.attempts == 0
    assert stopped.saved_iteration >= saved
    assert (executor.state_dir / f"job-{job.id}.pt").exists()
    assert events.kinds(job.id)[-1] == "progress"

    # A new executor removes stale state files and resumes the job from its saved state.
    stale = executor.state_dir / "job-9999.pt"
    stale.write_bytes(b"stale")
    partial = executor.state_dir / ".job-9999.pt.partial"
    partial.write_bytes(b"partial")
    restarted = Executor(store, settings, events)
    recovered = await restarted.start()
    try:
        assert recovered == []
        assert not stale.exists()
        assert not partial.exists()
        final = await events.wait_final(job.id)
    finally:
        await restarted.stop(timeout=20)

    assert final.kind == "finished"
    starts = events.of(job.id, "started")
    assert [e.data["resumed_at"] for e in starts] == [None, stopped.saved_iteration]
    assert events.of(job.id, "progress")[-1].data["iteration"] == 120
    assert not (executor.state_dir / f"job-{job.id}.pt").exists()


def test_bot_process_does_not_import_torch():
    code = (
        "import sys, bot.executor, bot.store, bot.worker, bot.guild_config\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPOSITORY, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr


def test_real_allocation_failure_counts_as_out_of_memory():
    import torch

    from bot.worker import _is_out_of_memory, _oom_message

    with pytest.raises(RuntimeError) as raised:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte

    assert _is_out_of_memory(raised.value)
    assert not _is_out_of_memory(RuntimeError("shape mismatch"))
    message = _oom_message(GenerationRequest([Prompt("x")], seed=1, width=512, height=384))
    assert "512x384" in message
    assert "256x192" in message


# -- start-up checks and the first estimate ---------------------------------------------------


async def test_missing_models_stop_start_and_leave_no_worker(store, settings, tmp_path):
    missing = tmp_path / "nowhere" / "vqgan.ckpt"
    executor = Executor(store, settings.replace(vqgan_model=str(missing)), RecordingEvents())

    with pytest.raises(ModelsUnavailable) as raised:
        await executor.start()

    assert str(raised.value).startswith(
        f"The models could not be loaded: VQGAN checkpoint not found: {missing}"
    )
    assert multiprocessing.active_children() == []
    await executor.stop()


async def test_first_estimate_comes_from_warm_up(store, settings, tiny_models, caplog):
    """Before any job ran, the queue estimate is this machine's speed with these models."""
    caplog.set_level(logging.INFO, logger="bot.executor")
    events = RecordingEvents()
    executor = Executor(store, settings, events)
    await executor.start()
    try:
        assert await executor.wait_warmed_up(60)
        assert "Timing a warm-up generation" in caplog.text

        # Stored without waking the dispatcher, so the estimate is made with nothing measured
        # but the warm-up.
        new = NewJob(GUILD, 10, 1, "a red circle", request(tiny_models, iterations=40))
        job, _ = await store.enqueue(new, per_user_limit=10, queue_limit=100)
        estimate = await executor.eta_seconds(job.id)
        assert estimate is not None

        started = time.monotonic()
        executor.wake()
        assert (await events.wait_final(job.id)).kind == "finished"
        actual = time.monotonic() - started
    finally:
        await executor.stop(timeout=20)
    print(f"\nestimated {estimate:.2f} s, took {actual:.2f} s")
    # Right to within an order of magnitude. An estimate from real-model CPU timings gives
    # about 25 times the actual time for this size.
    assert actual / 10 < estimate < actual * 10

    # The next start on the same device with the same models takes the stored speed.
    caplog.clear()
    restarted = Executor(store, settings, events)
    await restarted.start()
    try:
        assert await restarted.wait_warmed_up(5)
        assert await restarted.eta_seconds(job.id) is None  # finished, so not in the queue
        assert "Timing a warm-up generation" not in caplog.text
        again = NewJob(GUILD, 10, 1, "a red circle", request(tiny_models, iterations=40))
        queued, _ = await store.enqueue(again, per_user_limit=10, queue_limit=100)
        assert await restarted.eta_seconds(queued.id) is not None
    finally:
        await restarted.stop(timeout=20)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
async def test_worker_starts_without_token(store, settings, monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "token-the-worker-must-not-see")
    executor = Executor(store, settings, RecordingEvents())
    await executor.start()
    try:
        pid = executor.info().worker_pid
        environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
    finally:
        await executor.stop(timeout=20)

    assert b"token-the-worker-must-not-see" not in environ
    assert b"PATH=" in environ
    assert os.environ["DISCORD_TOKEN"] == "token-the-worker-must-not-see"


class HeldPostEvents(RecordingEvents):
    """JobEvents whose final post of the first finished job waits until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.held_job_id: int | None = None

    async def job_finished(self, job: Job, png: bytes, duration_s: float) -> None:
        if self.held_job_id is None:
            self.held_job_id = job.id
            await self.release.wait()
        await super().job_finished(job, png, duration_s)


def delivered_at(settings: Settings, job_id: int) -> float | None:
    with contextlib.closing(sqlite3.connect(settings.database_path)) as db:
        return db.execute("SELECT delivered_at FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


async def test_slow_final_post_does_not_hold_queue(store, settings, tiny_models):
    events = HeldPostEvents()
    executor = Executor(store, settings, events)
    await executor.start()
    try:
        first = await enqueue(store, executor, request(tiny_models), user=1)
        second = await enqueue(store, executor, request(tiny_models), user=2)

        # The second job runs and is posted while the first one's post still waits.
        await events.wait_final(second.id)
        assert events.held_job_id == first.id
        assert events.of(first.id, "finished") == []
        assert await asyncio.to_thread(delivered_at, settings, first.id) is None

        events.release.set()
        await events.wait_final(first.id)
    finally:
        await executor.stop(timeout=20)

    assert await asyncio.to_thread(delivered_at, settings, first.id) is not None


async def test_stop_leaves_stuck_post_to_next_start(store, settings, tiny_models):
    events = HeldPostEvents()
    executor = Executor(store, settings, events)
    await executor.start()
    job = await enqueue(store, executor, request(tiny_models))
    await events.wait_for(lambda: events.held_job_id == job.id)

    started = time.monotonic()
    await executor.stop(timeout=5)
    stop_seconds = time.monotonic() - started

    assert stop_seconds < 8
    assert await asyncio.to_thread(delivered_at, settings, job.id) is None

    replay = RecordingEvents()
    restarted = Executor(store, settings, replay)
    await restarted.start()
    try:
        posted = await replay.wait_final(job.id)
    finally:
        await restarted.stop(timeout=20)

    assert posted.kind == "finished"
    assert await asyncio.to_thread(delivered_at, settings, job.id) is not None


def test_may_download_only_for_names_and_tags(tiny_models):
    from bot.executor import _may_download

    local = Settings(vqgan_model=tiny_models.vqgan, clip_models=(tiny_models.clip,))
    assert not _may_download(local)
    assert _may_download(Settings(vqgan_model=tiny_models.vqgan))  # CLIP by tag
    assert _may_download(Settings(clip_models=(tiny_models.clip,)))  # registered VQGAN name
