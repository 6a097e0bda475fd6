"""Graceful shutdown of the real ``python -m bot`` process on SIGTERM and SIGINT.

Each test starts ``python -m bot --sandbox --tiny --data-dir DIR`` (the real bot against
simcord, with tiny models, keeping its database in DIR) in a session of its own, with a long
job that the sandbox's admin requests at start. Once the job has saved a resumable state,
the test sends a signal, either to the bot process alone or to its whole process group, as
a terminal's Ctrl-C or a service manager does. The process must exit with status 0 within
10 s, leaving the job queued at the front with its saved state on disk, and the worker
process must be gone.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
# Tiny models run about 8 iterations/s at 128x128 on one thread, so this job outlasts the test.
LONG_PROMPT = "a slow lighthouse --iter 1000"
SHUTDOWN_LIMIT_S = 10.0
START_TIMEOUT_S = 180.0
WORKER_PID_RE = re.compile(r"Started generator worker pid (\d+)")
DATA_DIR_RE = re.compile(r"Sandbox data in (\S+)")


@dataclass
class Sandbox:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: re.Pattern[str]) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (match := pattern.search(self.log())) is None:
            assert self.process.poll() is None, f"the bot exited early:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern.pattern!r} in:\n{self.log()}"
            time.sleep(0.1)
        return match


def start_sandbox(tmp_path: Path) -> Sandbox:
    log_path = tmp_path / "bot.log"
    environment = {
        **os.environ,
        "IMAGINE_THREADS": "1",
        "IMAGINE_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "bot", "--sandbox", "--tiny"),
                *("--data-dir", str(tmp_path / "data"), "--prompt", LONG_PROMPT),
            ],
            cwd=REPOSITORY,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Sandbox(process, log_path)


def read_job(database: Path) -> tuple | None:
    with sqlite3.connect(database, timeout=5) as connection:
        return connection.execute(
            "SELECT state, saved_iteration, priority, attempts, state_path FROM jobs WHERE id = 1"
        ).fetchone()


def wait_for_saved_state(database: Path, sandbox: Sandbox) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert sandbox.process.poll() is None, f"the bot exited early:\n{sandbox.log()}"
        job = read_job(database) if database.exists() else None
        if job is not None and job[0] == "running" and job[1] is not None:
            return job[1]
        assert time.monotonic() < deadline, f"no saved state in time:\n{sandbox.log()}"
        time.sleep(0.1)


def process_exists(pid: int) -> bool:
    """Return whether ``pid`` runs; a zombie (exited, not yet reaped) does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize(
    ("signum", "whole_group"),
    [
        (signal.SIGTERM, False),  # kill PID
        (signal.SIGINT, True),  # Ctrl-C in a terminal
        (signal.SIGTERM, True),  # a service manager stopping every process of the service
    ],
    ids=["sigterm", "sigint-group", "sigterm-group"],
)
def test_signal_stops_bot_gracefully(tmp_path, signum, whole_group):
    sandbox = start_sandbox(tmp_path)
    try:
        database = Path(sandbox.wait_for_log(DATA_DIR_RE)[1]) / "imagine.sqlite3"
        worker_pid = int(sandbox.wait_for_log(WORKER_PID_RE)[1])
        saved = wait_for_saved_state(database, sandbox)

        signalled = time.monotonic()
        if whole_group:
            os.killpg(sandbox.process.pid, signum)
        else:
            sandbox.process.send_signal(signum)
        try:
            returncode = sandbox.process.wait(timeout=SHUTDOWN_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {SHUTDOWN_LIMIT_S} s after {signum.name}:\n{sandbox.log()}")
        shutdown_s = time.monotonic() - signalled
    finally:
        if sandbox.process.poll() is None:
            os.killpg(sandbox.process.pid, signal.SIGKILL)
            sandbox.process.wait()

    log = sandbox.log()
    target = "process group" if whole_group else "process"
    print(f"\n{signum.name} to the {target}: exited in {shutdown_s:.2f} s")
    assert returncode == 0, log
    assert f"Received {signum.name}" in log
    assert "Traceback" not in log
    assert " ERROR " not in log

    state, saved_iteration, priority, attempts, state_path = read_job(database)
    assert state == "queued"
    assert priority == 1  # first in line when the bot starts again
    assert attempts == 0  # a shutdown is no crash
    assert saved_iteration >= saved
    assert Path(state_path).is_file()

    assert wait_until_gone(worker_pid, 2.0), f"the worker (pid {worker_pid}) outlived the bot"


def test_killed_bot_leaves_no_worker(tmp_path):
    sandbox = start_sandbox(tmp_path)
    try:
        database = Path(sandbox.wait_for_log(DATA_DIR_RE)[1]) / "imagine.sqlite3"
        worker_pid = int(sandbox.wait_for_log(WORKER_PID_RE)[1])
        saved = wait_for_saved_state(database, sandbox)

        sandbox.process.kill()  # SIGKILL to the bot process alone
        sandbox.process.wait()
        worker_exited = wait_until_gone(worker_pid, 5.0)
    finally:
        if process_exists(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)

    # The worker exits at its next message to the bot, which fails with a broken pipe.
    assert worker_exited, f"the worker (pid {worker_pid}) kept running without the bot"
    state, saved_iteration, _, attempts, state_path = read_job(database)
    assert state == "running"  # as the crash left it: the next start requeues it
    assert attempts == 0
    assert saved_iteration >= saved
    assert Path(state_path).is_file()
