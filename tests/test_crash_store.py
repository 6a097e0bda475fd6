"""SIGKILL a process that writes jobs to the database, many times, at random points.

A child process opens the store as the bot does (migrations, then ``recover``), and then
enqueues jobs in a loop. Every third enqueue it also takes the next job and marks it done,
as the executor does. It prints each step to a pipe only after the store call returned, so a
printed line is an acknowledged write. The test kills the child with SIGKILL at random
moments (some during start-up, most inside the write loop) and starts a new one on the same
file. Afterwards it checks that no acknowledged write was lost or doubled and that the file
is intact. A final dequeue loop must then hand out every remaining job once.

IMAGINE_CRASH_KILLS sets the number of kills (default 40) and IMAGINE_CRASH_SEED the seed
of the kill times.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bot.store import JobStore, NewJob

REPOSITORY = Path(__file__).resolve().parent.parent
KILLS = int(os.environ.get("IMAGINE_CRASH_KILLS", "40"))
SEED = int(os.environ.get("IMAGINE_CRASH_SEED", "1729"))
# Share of kills aimed at start-up (imports, migrations, recovery) instead of the write loop.
STARTUP_KILL_SHARE = 0.2
# The child's start-up takes about 0.3-1 s, so a start-up kill lands within this many seconds.
STARTUP_KILL_WINDOW_S = 0.8
# A write-loop kill lands this long after the child reported that it is ready.
LOOP_KILL_WINDOW_S = 0.3
READY_TIMEOUT_S = 60.0

WRITER = textwrap.dedent(
    """
    import asyncio
    import sys

    from bot.store import JobStore, NewJob

    LIMIT = 10**9


    def acknowledge(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()


    async def main(path, run):
        store = await JobStore.open(path)
        await store.recover()
        acknowledge("ready")
        count = 0
        while True:
            count += 1
            token = f"{run}-{count}"
            new = NewJob(1, 10, count % 5, token, {"token": token})
            job, _ = await store.enqueue(new, LIMIT, LIMIT)
            acknowledge(f"queued {job.id} {token}")
            if count % 3 == 0:
                running = await store.next_job()
                if running is not None:
                    acknowledge(f"running {running.id}")
                    if await store.mark_done(running.id, None) is not None:
                        acknowledge(f"done {running.id}")


    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@dataclass
class Acknowledged:
    """What the writers acknowledged, in order, over all runs."""

    queued: dict[int, str] = field(default_factory=dict)  # job id -> token
    events: list[tuple[str, int]] = field(default_factory=list)  # ("running"|"done", id)
    loop_kills: int = 0
    startup_kills: int = 0

    def add(self, line: str) -> None:
        kind, job_id, *rest = line.split()
        if kind == "queued":
            assert int(job_id) not in self.queued, f"id {job_id} acknowledged twice"
            self.queued[int(job_id)] = rest[0]
        else:
            self.events.append((kind, int(job_id)))


def wait_for_ready(process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        if readable:
            line = process.stdout.readline()
            assert line == b"ready\n", f"unexpected first line {line!r}"
            return
        assert process.poll() is None, f"the writer exited with {process.returncode}"
    raise AssertionError(f"the writer was not ready within {READY_TIMEOUT_S} s")


def run_and_kill(path: Path, run: int, chooser: random.Random, seen: Acknowledged) -> None:
    """Start one writer, SIGKILL it at a random moment and record what it acknowledged."""
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(run)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
    )
    try:
        if chooser.random() < STARTUP_KILL_SHARE:
            time.sleep(chooser.uniform(0, STARTUP_KILL_WINDOW_S))
            seen.startup_kills += 1
        else:
            wait_for_ready(process)
            time.sleep(chooser.uniform(0, LOOP_KILL_WINDOW_S))
            seen.loop_kills += 1
    finally:
        os.kill(process.pid, signal.SIGKILL)
        output = process.stdout.read().decode()
        process.wait()
    assert process.returncode == -signal.SIGKILL

    # A line cut short by the kill was never acknowledged.
    complete = output if output.endswith("\n") else output[: output.rfind("\n") + 1]
    for line in complete.splitlines():
        if line != "ready":
            seen.add(line)


async def drain(path: Path) -> list[int]:
    """Open the store as the bot does and run every waiting job once; return their ids."""
    store = await JobStore.open(path)
    try:
        await store.recover()
        taken: list[int] = []
        while (job := await store.next_job()) is not None:
            taken.append(job.id)
            assert await store.mark_done(job.id, None) is not None
        assert await store.queue() == []
        return taken
    finally:
        await store.close()


def test_enqueue_survives_random_sigkills(tmp_path):
    path = tmp_path / "imagine.sqlite3"
    chooser = random.Random(SEED)
    seen = Acknowledged()

    started = time.monotonic()
    for run in range(KILLS):
        run_and_kill(path, run, chooser, seen)
    elapsed = time.monotonic() - started
    drained = asyncio.run(drain(path))

    with sqlite3.connect(path) as connection:
        integrity = connection.execute("PRAGMA integrity_check").fetchall()
        rows = connection.execute("SELECT id, prompt, state FROM jobs").fetchall()
    by_id = {job_id: (prompt, state) for job_id, prompt, state in rows}
    tokens = Counter(prompt for _, prompt, _ in rows)
    done_acknowledged = [job_id for kind, job_id in seen.events if kind == "done"]
    print(
        f"\n{KILLS} SIGKILLs ({seen.startup_kills} at start-up, {seen.loop_kills} in the write "
        f"loop) in {elapsed:.1f} s: {len(seen.queued)} acknowledged enqueues, {len(rows)} rows, "
        f"{len(done_acknowledged)} acknowledged completions, {len(drained)} jobs run afterwards"
    )

    assert integrity == [("ok",)]
    assert seen.loop_kills > 0
    assert len(seen.queued) > KILLS  # the kills hit a busy writer, not an idle one

    # Every acknowledged enqueue is there, once, with its own prompt.
    lost = sorted(set(seen.queued) - set(by_id))
    assert lost == [], f"acknowledged but lost (seed {SEED})"
    wrong = {i: t for i, t in seen.queued.items() if by_id[i][0] != t}
    assert wrong == {}, f"ids holding another job's prompt (seed {SEED})"
    doubled = [token for token, count in tokens.items() if count > 1]
    assert doubled == [], f"prompts stored twice (seed {SEED})"

    # Nothing runs twice. A completed job is never taken again, and the final loop takes each
    # remaining job once. Afterwards every job is done, or failed after three interruptions.
    completed: set[int] = set()
    for kind, job_id in seen.events:
        assert job_id not in completed, f"job {job_id} taken again after it was done"
        if kind == "done":
            completed.add(job_id)
    assert len(drained) == len(set(drained))
    assert completed.isdisjoint(drained)
    assert all(by_id[job_id][1] == "done" for job_id in completed)
    assert {state for _, state in by_id.values()} <= {"done", "failed"}


async def test_undelivered_pictures_found_after_crash(tmp_path):
    store = await JobStore.open(tmp_path / "imagine.sqlite3")
    try:
        limit = 10**6
        posted, lost, delivered = [
            (await store.enqueue(NewJob(1, 10, user, "p", {}), limit, limit))[0]
            for user in (1, 2, 3)
        ]
        for job in (posted, lost, delivered):
            await store.set_message(job.id, 10, 1000 + job.id)
            await store.next_job()
            await store.mark_done(job.id, f"/results/job-{job.id}.png")
        # The picture of `posted` reached the channel (its message changed) before the crash,
        # `lost` died before its post, and `delivered` went through normally.
        await store.set_message(posted.id, 10, 5000)
        await store.mark_delivered(delivered.id)

        assert [job.id for job in await store.undelivered()] == [lost.id]
        await store.mark_delivered(lost.id)
        assert await store.undelivered() == []
    finally:
        await store.close()
