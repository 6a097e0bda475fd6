"""The executor: takes jobs from the store one at a time and runs them in a worker process.

One dispatcher task waits on an ``asyncio.Event`` while the queue is empty, takes the next
job (``JobStore.next_job``), sends it to the worker process (``bot.worker``) and relays what
the worker reports to ``JobEvents`` and the store. The worker is a ``spawn``ed child, so an
exception, an out-of-memory error or a SIGKILL there never takes the bot down: the job is
failed or requeued, a new worker is started and the queue goes on.

A thread reads the worker's pipe and hands each message to the event loop, so the loop does
not wait on pipe reads. This module does not import torch.

Start-up checks what would otherwise fail every job: :meth:`Executor.start` waits until the
worker has resolved its device and loaded (or downloaded) the models, and raises
:class:`DeviceUnavailable` or :class:`ModelsUnavailable` with a message for the operator.
Before its first job, the dispatcher times a warm-up generation, so that the first queue
estimates come from this machine and these models (see :func:`iteration_cost`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.jobs import Job, JobEvents
from bot.worker import WorkerConfig, worker_main
from generator.registry import is_registered

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from bot.settings import Settings
    from bot.store import JobStore

__all__ = [
    "DeviceUnavailable",
    "Executor",
    "ExecutorInfo",
    "JobEvents",
    "ModelsUnavailable",
    "WorkerError",
    "iteration_cost",
]

log = logging.getLogger(__name__)

# Starting a worker imports torch, which takes a few seconds (longer on a busy machine).
WORKER_START_TIMEOUT_S = 120.0
WORKER_EXIT_TIMEOUT_S = 5.0
# stop() finishes within this many seconds, whatever the worker does.
STOP_TIMEOUT_S = 10.0
# The part of stop()'s time kept for terminating a worker that did not stop its job in time.
WORKER_KILL_RESERVE_S = 3.0
RATE_META_KEY = "iterations_per_s"
# The measured speed for queue estimates, with the device and models it was measured on.
CALIBRATION_META_KEY = "speed_calibration"
# The relative cost of one iteration's parts: seconds per CLIP cutout and per 256x256 of
# decoded pixels, each with its backward pass (ViT-B/32 and the f16 VQGAN on a 2-core CPU).
# Only their ratio matters: a measured speed scales both.
CUTOUT_COST = 0.37
DECODER_COST_PER_256_SQUARE = 9.5
STATE_FILE_PATTERN = re.compile(r"job-(\d+)\.pt")

WORKER_START_FAILED = (
    "The image generator could not start, so this picture was not made. The bot owner can "
    "find the details in the bot's log."
)
JOB_INTERNAL_ERROR = (
    "Something went wrong while handling this picture (job {job_id}). The bot owner can find "
    "the details in the bot's log; you can try again."
)


class WorkerError(RuntimeError):
    """The worker process failed to start or exited before reporting its device."""


class DeviceUnavailable(WorkerError):
    """``IMAGINE_DEVICE`` names a device this machine does not have; the message lists them."""


class ModelsUnavailable(WorkerError):
    """The configured models could not be loaded. The message explains how to get them."""


def iteration_cost(request: Mapping[str, Any]) -> float:
    """Return the relative cost of one iteration of ``request`` (a ``GenerationRequest`` dict).

    The unit is roughly a second on a 2-core CPU; a measured speed turns it into seconds on
    the machine at hand. Missing fields take the generator's defaults (256x256, 32 cutouts).
    """
    pixels = float(request.get("width", 256)) * float(request.get("height", 256))
    cutouts = float(request.get("cutn", 32))
    return CUTOUT_COST * cutouts + DECODER_COST_PER_256_SQUARE * pixels / (256 * 256)


@dataclass(frozen=True)
class ExecutorInfo:
    """A snapshot of the executor for /info.

    ``device`` is the torch device the worker resolved (``settings.device`` until it has).
    ``iterations_per_s`` is measured on the last job that ran, or on the warm-up at start
    (None before either). It depends on the size and cutouts measured. ``posting_job_ids``
    are the finished jobs whose picture is being posted.
    """

    device: str
    vqgan: str
    clip_models: tuple[str, ...]
    models_loaded: bool
    models_error: str | None
    iterations_per_s: float | None
    busy_job_id: int | None
    busy_iteration: int | None
    worker_pid: int | None
    worker_restarts: int
    posting_job_ids: frozenset[int] = frozenset()

    @property
    def is_cpu(self) -> bool:
        """Whether generation runs on the CPU (then guilds get the draft preset defaults)."""
        return self.device == "cpu"


def _may_download(settings: Settings) -> bool:
    """Return whether loading the configured models may download weights.

    A registered VQGAN name or a CLIP tag (``ViT-B-32/openai``) may, but local files do not.
    """
    if is_registered(settings.vqgan_model):
        return True
    return any(not Path(spec.partition("/")[2]).is_file() for spec in settings.clip_models)


@contextlib.contextmanager
def _environment_without(name: str) -> Iterator[None]:
    """Remove ``name`` from this process's environment, and put it back on exit."""
    value = os.environ.pop(name, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[name] = value


class _WorkerHandle:
    """One worker process, its pipe, its events and the thread that reads the pipe."""

    def __init__(self, config: WorkerConfig) -> None:
        context = multiprocessing.get_context("spawn")
        self.cancel_event = context.Event()
        self.stop_event = context.Event()
        self._connection, child_connection = context.Pipe()
        self.process = context.Process(
            target=worker_main,
            args=(child_connection, self.cancel_event, self.stop_event, config),
            name="imagine-worker",
            daemon=True,
        )
        # The worker never talks to Discord, and a process's /proc/<pid>/environ shows the
        # environment it started with, so the token is left out of it from the start.
        with _environment_without("DISCORD_TOKEN"):
            self.process.start()
        self.pid: int | None = self.process.pid
        # Only the child has the other end now, so its exit ends our reads with EOFError.
        child_connection.close()

        self._messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader = threading.Thread(
            target=self._read,
            args=(asyncio.get_running_loop(),),
            name=f"imagine-worker-reader-{self.process.pid}",
            daemon=True,
        )
        self._reader.start()
        log.info("Started generator worker pid %s", self.process.pid)

    def alive(self) -> bool:
        try:
            return self.process.is_alive()
        except ValueError:
            return False  # already closed by shutdown()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            try:
                message: dict[str, Any] | None = self._connection.recv()
            except (EOFError, OSError):
                message = None  # the worker exited
            try:
                loop.call_soon_threadsafe(self._messages.put_nowait, message)
            except RuntimeError:
                return  # the event loop is closed
            if message is None:
                return

    async def receive(self) -> dict[str, Any] | None:
        """Return the next message, or None once the worker has exited."""
        return await self._messages.get()

    def send(self, message: dict[str, Any]) -> None:
        """Send a message; raise WorkerError if the worker is gone."""
        try:
            self._connection.send(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as error:
            raise WorkerError(f"The worker (pid {self.pid}) is gone: {error}") from error

    async def shutdown(self, timeout: float = WORKER_EXIT_TIMEOUT_S) -> None:
        """Ask the worker to exit; terminate, then kill it if it does not within ``timeout``."""
        if self.alive():
            with contextlib.suppress(WorkerError):
                self.send({"type": "exit"})
            await asyncio.to_thread(self.process.join, timeout)
        if self.alive():
            log.warning("Worker pid %s did not exit in %.1f s; terminating it", self.pid, timeout)
            self.process.terminate()
            await asyncio.to_thread(self.process.join, 1.0)
        if self.alive():
            self.process.kill()
            await asyncio.to_thread(self.process.join, 2.0)

        # Close our end only after the reader thread saw EOF, so no thread reads a closed fd.
        await asyncio.to_thread(self._reader.join, 2.0)
        if not self._reader.is_alive():
            self._connection.close()
        with contextlib.suppress(ValueError):
            self.process.close()


class Executor:
    """Runs jobs from a :class:`JobStore` one at a time on one device, in a worker process.

    Call :meth:`start` once the store is open, :meth:`wake` after each enqueue, and
    :meth:`stop` at shutdown.
    """

    def __init__(self, store: JobStore, settings: Settings, events: JobEvents) -> None:
        self._store: JobStore = store
        self._settings: Settings = settings
        self._events: JobEvents = events
        self.state_dir: Path = Path(settings.data_dir) / "state"
        self.results_dir: Path = Path(settings.data_dir) / "results"

        self._wake: asyncio.Event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._worker: _WorkerHandle | None = None
        self._stopping: bool = False
        self._current: Job | None = None
        self._current_iteration: int = 0
        # Final posts in flight. They run beside the next job, so a slow or failing Discord
        # does not keep the device idle.
        self._deliveries: dict[int, asyncio.Task[None]] = {}

        self._device: str | None = None
        self._models_loaded: bool = False
        self._models_error: str | None = None
        self._rate: float | None = None
        # Seconds per unit of iteration_cost(), measured at start and by every job.
        self._seconds_per_cost: float | None = None
        self._warmed_up: asyncio.Event = asyncio.Event()
        self._restarts: int = 0

        self._handlers: dict[str, Callable[[_WorkerHandle, Job, dict[str, Any]], Awaitable[bool]]]
        self._handlers = {
            "started": self._on_started,
            "progress": self._on_progress,
            "state": self._on_state,
            "done": self._on_done,
            "failed": self._on_failed,
            "cancelled": self._on_cancelled,
            "stopped": self._on_stopped,
        }

    # -- public interface ---------------------------------------------------------------

    async def start(self) -> list[Job]:
        """Recover interrupted jobs, start the worker and the dispatcher.

        Returns the jobs that were left running by the previous process, in their new state
        (``queued`` again at the front, or ``failed`` after repeated interruptions), so the
        Discord layer can tell their channels.

        Waits until the worker has resolved its device (a few seconds: it imports torch) and
        loaded the models, which includes downloading registered ones that are not in the
        models directory yet. Unless a speed measured on the same device and models is
        stored, the dispatcher then times a warm-up generation before it takes the first
        job: about a second on a GPU or with tiny models, about 8 s on a 2-core CPU with the
        real ones (see :meth:`wait_warmed_up`).

        Raises:
            DeviceUnavailable: ``IMAGINE_DEVICE`` names a device this machine lacks.
            ModelsUnavailable: a model is missing, cannot be downloaded or is damaged.
            WorkerError: the worker did not start or died while loading.
        On any of these no worker is left running; the store keeps the recovered jobs.
        """
        recovered = await self._store.recover()
        keep = await self._store.job_ids(["queued"])
        await asyncio.to_thread(self._remove_stale_states, keep)
        self._rate = await self._store.get_meta(RATE_META_KEY)

        try:
            worker = await self._ensure_worker()
            await self._wait_for_models(worker)
        except BaseException:
            if self._worker is not None:
                await self._worker.shutdown()
                self._worker = None
            raise
        self._task = asyncio.create_task(self._dispatch_forever(), name="imagine-dispatcher")
        return recovered

    async def wait_warmed_up(self, timeout: float) -> bool:
        """Wait until the start-up speed measurement is over; return False after ``timeout`` s.

        From then on :meth:`eta_seconds` has a figure, unless the warm-up failed (logged).
        """
        try:
            await asyncio.wait_for(self._warmed_up.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def wake(self) -> None:
        """Tell the dispatcher that a job was enqueued."""
        self._wake.set()

    async def cancel(self, job_id: int) -> bool:
        """Stop the running job ``job_id`` within one iteration; False if it is not running.

        This does not check ownership: call ``JobStore.cancel`` first, which does. The job's
        ``job_cancelled`` event follows once the worker has stopped.
        """
        if self._current is None or self._current.id != job_id or self._worker is None:
            return False
        log.info("Cancelling running job %d", job_id)
        self._worker.cancel_event.set()
        return True

    def info(self) -> ExecutorInfo:
        """Return the device, models, measured speed and the busy job."""
        worker = self._worker
        return ExecutorInfo(
            device=self._device or self._settings.device,
            vqgan=self._settings.vqgan_model,
            clip_models=tuple(self._settings.clip_models),
            models_loaded=self._models_loaded,
            models_error=self._models_error,
            iterations_per_s=self._rate,
            busy_job_id=None if self._current is None else self._current.id,
            busy_iteration=None if self._current is None else self._current_iteration,
            worker_pid=worker.pid if worker is not None and worker.alive() else None,
            worker_restarts=self._restarts,
            posting_job_ids=frozenset(self._deliveries),
        )

    async def eta_seconds(self, job_id: int) -> float | None:
        """Estimate the seconds until ``job_id`` is finished, or None without a measurement.

        The estimate adds the iterations left of the running job and of every job before
        ``job_id``, each weighted by :func:`iteration_cost` of its size and cutouts and
        scaled by the speed measured at start or on the last job. It is rough: the cost
        model's weights come from one CPU, and other load on the machine changes the speed.
        """
        if not self._seconds_per_cost:
            return None
        seconds = 0.0
        for job in await self._store.queue(limit=self._settings.max_queue + 1):
            if self._current is not None and job.id == self._current.id:
                done = self._current_iteration
            else:
                done = job.saved_iteration or 0
            remaining = max(0, job.iterations - done)
            seconds += remaining * iteration_cost(job.request) * self._seconds_per_cost
            if job.id == job_id:
                return seconds
        return None

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop taking jobs, stop the running job and the worker within ``timeout`` seconds.

        The running job goes back to the front of the queue without counting an interruption.
        The worker stops it before its next iteration, so a later start resumes it from its
        last saved state (saved every ``progress_every`` iterations). A worker still inside
        an iteration ``WORKER_KILL_RESERVE_S`` before the deadline is terminated, then killed.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        self._stopping = True
        self._wake.set()
        running = self._current
        if self._worker is not None:
            self._worker.stop_event.set()

        task = self._task
        graceful = True
        if task is not None:
            wait = max(0.0, timeout - WORKER_KILL_RESERVE_S)
            done, _ = await asyncio.wait({task}, timeout=wait)
            if not done:
                log.warning("The running job did not stop within %.1f s; cancelling it", wait)
                graceful = False
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if running is not None and await self._store.requeue(running.id) is not None:
            log.info("Job %d requeued at shutdown", running.id)

        if self._worker is not None:
            # A worker still inside a long iteration gets only a moment before SIGTERM.
            remaining = deadline - asyncio.get_running_loop().time() - 2.0
            await self._worker.shutdown(max(0.5, remaining) if graceful else 0.5)
            self._worker = None
        await self._finish_deliveries(deadline - asyncio.get_running_loop().time())
        log.info("The executor stopped")

    async def _finish_deliveries(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for final posts in flight, then cancel the rest.

        A cancelled post leaves its job undelivered, so the next start posts it.
        """
        if not self._deliveries:
            return
        deliveries = dict(self._deliveries)
        _, pending = await asyncio.wait(deliveries.values(), timeout=max(0.0, timeout))
        for job_id, task in deliveries.items():
            if task in pending:
                log.warning(
                    "Job %d: its picture was not posted before shutdown; the next start posts it",
                    job_id,
                )
                task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- dispatcher ---------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        try:
            await self._redeliver()
        except Exception:  # a failed redelivery must not keep the queue from running
            log.exception("Posting the pictures of the last run failed")
        try:
            await self._calibrate()
        except WorkerError as error:
            log.warning("The warm-up did not finish (%s); estimates wait for the first job", error)
        finally:
            self._warmed_up.set()
        delay = 1.0
        while not self._stopping:
            try:
                await self._dispatch()
            except asyncio.CancelledError:
                raise
            except Exception:  # the queue must keep going, whatever failed
                log.exception("The job dispatcher failed; restarting it in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _dispatch(self) -> None:
        while not self._stopping:
            # Cleared before looking, so an enqueue during the look still wakes us.
            self._wake.clear()
            job = await self._store.next_job()
            if job is None:
                await self._wake.wait()
                continue
            if self._stopping:
                await self._store.requeue(job.id)
                return
            await self._run(job)

    async def _run(self, job: Job) -> None:
        self._current = job
        self._current_iteration = job.saved_iteration or 0
        try:
            try:
                worker = await self._ensure_worker()
            except WorkerError as error:
                log.error("Job %d failed: the generator worker could not start: %s", job.id, error)
                await self._fail(job, WORKER_START_FAILED)
                return
            if self._stopping:
                # stop() came while a new worker started, and that worker's stop_event is unset.
                await self._store.requeue(job.id)
                return
            if await self._send_job(worker, job):
                await self._relay(worker, job)
        except Exception:
            log.exception("Job %d: handling failed", job.id)
            await self._fail(job, JOB_INTERNAL_ERROR.format(job_id=job.id))
            raise
        finally:
            self._current = None

    async def _send_job(self, worker: _WorkerHandle, job: Job) -> bool:
        """Send ``job`` to the worker; return False if it was cancelled before it started."""
        state_path = self._state_path(job.id)
        resume = await asyncio.to_thread(state_path.exists)
        worker.cancel_event.clear()

        # A cancel that came between next_job() and now found no running job to stop.
        stored = await self._store.get(job.id)
        if stored is None or stored.state != "running":
            log.info("Job %d was cancelled before it started", job.id)
            await self._remove_state(job.id)
            if stored is not None:
                await self._emit("job_cancelled", stored)
            return False

        log.info("Job %d started%s", job.id, " (resuming)" if resume else "")
        # A send to a dead worker is noticed by _relay, which reads the pipe's end.
        with contextlib.suppress(WorkerError):
            worker.send(
                {
                    "type": "run",
                    "job_id": job.id,
                    "request": job.request,
                    "state_path": str(state_path),
                    "resume": resume,
                }
            )
        return True

    async def _relay(self, worker: _WorkerHandle, job: Job) -> None:
        """Pass the worker's messages about ``job`` on until its final one."""
        while True:
            message = await worker.receive()
            if message is None:
                await self._worker_died(worker, job)
                return
            if self._note_worker_status(message):
                continue
            if message.get("job_id") != job.id:
                stray = message.get("job_id")
                log.warning("Ignoring a %s message for job %s", message["type"], stray)
                continue
            finished = await self._handlers[message["type"]](worker, job, message)
            if finished:
                return

    async def _redeliver(self) -> None:
        """Post the pictures of jobs that finished just before the previous process died."""
        for job in await self._store.undelivered():
            if job.result_path is None:
                await self._store.mark_delivered(job.id)
                continue
            try:
                png = await asyncio.to_thread(Path(job.result_path).read_bytes)
            except OSError as error:
                log.error("Job %d: cannot read its picture to post it: %s", job.id, error)
                await self._store.mark_delivered(job.id)
                continue
            log.warning("Job %d finished but its picture was not posted; posting it now", job.id)
            started = job.started_at or job.finished_at or 0.0
            duration = (job.finished_at or started) - started
            await self._emit("job_finished", job, png, duration)
            await self._store.mark_delivered(job.id)

    # -- worker messages ----------------------------------------------------------------

    async def _on_started(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        await self._emit("job_started", job, message["resumed_at"])
        return False

    async def _on_progress(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        self._current_iteration = message["iteration"]
        if message["iterations_per_s"]:
            self._rate = message["iterations_per_s"]
            self._seconds_per_cost = 1.0 / (self._rate * iteration_cost(job.request))

        # A job cancelled through the store alone still stops here.
        if not worker.cancel_event.is_set():
            stored = await self._store.get(job.id)
            if stored is None or stored.state != "running":
                log.info("Job %d is %s in the store; stopping it", job.id, stored and stored.state)
                worker.cancel_event.set()

        await self._emit(
            "job_progress", job, message["iteration"], message["total"], message["png"]
        )
        return False

    async def _on_state(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        await self._store.save_progress(job.id, message["iteration"], message["path"])
        return False

    async def _on_done(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        result_path = self.results_dir / f"job-{job.id}.png"
        await asyncio.to_thread(_write_file, result_path, message["png"])
        done = await self._store.mark_done(job.id, str(result_path))
        await self._remove_state(job.id)

        if done is None:
            # Cancelled while its last iteration ran.
            await asyncio.to_thread(result_path.unlink, missing_ok=True)
            await self._emit("job_cancelled", await self._store.get(job.id) or job)
            return True

        log.info("Job %d done in %.1f s", job.id, message["duration_s"])
        if self._rate:
            await self._store.set_meta(RATE_META_KEY, self._rate)
            await self._save_calibration()
        self._start_delivery(done, message["png"], message["duration_s"])
        return True

    def _start_delivery(self, job: Job, png: bytes, duration_s: float) -> None:
        """Post a finished job's picture in a task of its own, then mark the job delivered."""

        async def deliver() -> None:
            try:
                await self._emit("job_finished", job, png, duration_s)
                await self._store.mark_delivered(job.id)
            except Exception:  # the next start posts an undelivered picture again
                log.exception("Job %d: delivering the picture failed", job.id)

        task = asyncio.create_task(deliver(), name=f"imagine-deliver-{job.id}")
        self._deliveries[job.id] = task
        task.add_done_callback(lambda _: self._deliveries.pop(job.id, None))

    async def _on_failed(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        log.warning("Job %d failed (%s): %s", job.id, message["kind"], message["message"])
        await self._remove_state(job.id)
        failed = await self._store.mark_failed(job.id, message["message"])
        if failed is None:
            await self._emit("job_cancelled", await self._store.get(job.id) or job)
        else:
            await self._emit("job_failed", failed, message["message"])
        return True

    async def _on_cancelled(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        log.info("Job %d cancelled at iteration %d", job.id, message["iteration"])
        await self._remove_state(job.id)
        cancelled = await self._store.mark_cancelled(job.id)
        await self._emit("job_cancelled", cancelled or job)
        return True

    async def _on_stopped(self, worker: _WorkerHandle, job: Job, message: dict[str, Any]) -> bool:
        requeued = await self._store.requeue(job.id)
        saved = requeued.saved_iteration if requeued else None
        log.info("Job %d stopped for shutdown; requeued with state saved at %s", job.id, saved)
        if not self._stopping:
            # The worker stopped on its own (SIGTERM sent to it, as a service manager does
            # to every process of the service) and exits now. The next job gets a new one.
            log.warning("The generator worker (pid %s) stopped by itself", worker.pid)
            await worker.shutdown()
            self._worker = None
            self._restarts += 1
        return True

    def _note_worker_status(self, message: dict[str, Any]) -> bool:
        """Record device and model messages; return whether ``message`` was one."""
        kind = message["type"]
        if kind == "device":
            self._device = message["device"]
        elif kind == "ready":
            self._models_loaded, self._models_error = True, None
        elif kind == "models_failed":
            self._models_loaded, self._models_error = False, message["message"]
        else:
            return False
        return True

    # -- worker lifecycle -----------------------------------------------------------------

    async def _ensure_worker(self) -> _WorkerHandle:
        """Return a live worker, starting one if there is none or the last one died."""
        if self._worker is not None and self._worker.alive():
            return self._worker
        if self._worker is not None:
            log.warning("The generator worker (pid %s) had exited; restarting it", self._worker.pid)
            await self._worker.shutdown()
            self._worker = None
            self._restarts += 1

        worker = _WorkerHandle(self._worker_config())
        try:
            await asyncio.wait_for(self._wait_for_device(worker), WORKER_START_TIMEOUT_S)
        except asyncio.TimeoutError:
            await worker.shutdown()
            raise WorkerError(
                f"The worker did not report its device within {WORKER_START_TIMEOUT_S:.0f} s."
            ) from None
        except BaseException:
            # Also on cancellation (a stop() during start-up): leave no orphaned process.
            await worker.shutdown()
            raise
        self._worker = worker
        return worker

    async def _wait_for_device(self, worker: _WorkerHandle) -> None:
        while True:
            message = await worker.receive()
            if message is None:
                await asyncio.to_thread(worker.process.join, WORKER_EXIT_TIMEOUT_S)
                raise WorkerError(
                    f"The worker exited with code {worker.process.exitcode} while starting."
                )
            if message["type"] == "fatal":
                available = ", ".join(message.get("available") or ["cpu"])
                raise DeviceUnavailable(
                    f"IMAGINE_DEVICE={self._settings.device!r} cannot be used: "
                    f"{message['message']} Devices on this machine: {available}."
                )
            self._note_worker_status(message)
            if message["type"] == "device":
                log.info("The generator worker uses %s", self._device)
                return

    async def _wait_for_models(self, worker: _WorkerHandle) -> None:
        """Wait until the worker has loaded the configured models; raise if it could not."""
        settings = self._settings
        models = f"VQGAN {settings.vqgan_model}, CLIP {', '.join(settings.clip_models)}"
        if _may_download(settings):
            log.info(
                "Loading the models (%s); weights missing from %s are downloaded first",
                models,
                settings.models_dir,
            )
        else:
            log.info("Loading the models (%s)", models)
        while True:
            message = await self._next_status(worker, "loading the models")
            if message["type"] == "ready":
                return
            if message["type"] == "models_failed":
                raise ModelsUnavailable(f"The models could not be loaded: {message['message']}")

    async def _calibrate(self) -> None:
        """Take the stored speed for this device and these models, or time a warm-up."""
        stored = await self._store.get_meta(CALIBRATION_META_KEY)
        if isinstance(stored, dict) and stored.get("setup") == self._calibration_setup():
            self._seconds_per_cost = float(stored["seconds_per_cost"])
            return
        worker = self._worker
        if worker is None or self._stopping:
            return

        log.info("Timing a warm-up generation for the queue estimates")
        worker.send({"type": "measure"})
        while (message := await self._next_status(worker, "its warm-up"))["type"] != "speed":
            continue
        seconds = message["seconds_per_iteration"]
        if not seconds:
            if not self._stopping:
                log.warning("No warm-up timing; queue estimates wait for the first job")
            return
        self._rate = 1.0 / seconds
        self._seconds_per_cost = seconds / iteration_cost(message)
        await self._save_calibration()

    async def _next_status(self, worker: _WorkerHandle, doing: str) -> dict[str, Any]:
        """Return the worker's next message, noting status ones; raise if the worker exited."""
        message = await worker.receive()
        if message is None:
            await asyncio.to_thread(worker.process.join, WORKER_EXIT_TIMEOUT_S)
            raise WorkerError(
                f"The generator worker (pid {worker.pid}) exited with code "
                f"{worker.process.exitcode} while {doing}; its log lines above say why."
            )
        self._note_worker_status(message)
        return message

    def _calibration_setup(self) -> dict[str, Any]:
        """Return the setup a stored speed is valid for: the device, the models and the threads."""
        settings = self._settings
        return {
            "device": self._device,
            "vqgan": settings.vqgan_model,
            "clip": list(settings.clip_models),
            "threads": settings.threads,
        }

    async def _save_calibration(self) -> None:
        if self._seconds_per_cost:
            value = {"setup": self._calibration_setup(), "seconds_per_cost": self._seconds_per_cost}
            await self._store.set_meta(CALIBRATION_META_KEY, value)

    async def _worker_died(self, worker: _WorkerHandle, job: Job) -> None:
        """Handle a worker that exited mid-job: requeue or fail the job, drop the worker."""
        await asyncio.to_thread(worker.process.join, WORKER_EXIT_TIMEOUT_S)
        exit_code = worker.process.exitcode
        hint = " (SIGKILL: often the kernel's out-of-memory killer)" if exit_code == -9 else ""
        log.error(
            "Job %d: the generator worker (pid %s) died with exit code %s%s",
            job.id,
            worker.pid,
            exit_code,
            hint,
        )
        await worker.shutdown()
        self._worker = None
        self._restarts += 1

        interrupted = await self._store.interrupt(job.id)
        if interrupted is None:
            stored = await self._store.get(job.id)
            await self._remove_state(job.id)
            if stored is not None and stored.state == "cancelled":
                await self._emit("job_cancelled", stored)
        elif interrupted.state == "failed":
            await self._remove_state(job.id)
            await self._emit("job_failed", interrupted, interrupted.error or "")
        else:
            log.warning(
                "Job %d requeued at the front (interruption %d)", job.id, interrupted.attempts
            )

    def _worker_config(self) -> WorkerConfig:
        settings = self._settings
        return WorkerConfig(
            device=settings.device,
            vqgan=settings.vqgan_model,
            clip_models=tuple(settings.clip_models),
            models_dir=str(settings.models_dir),
            threads=settings.threads,
            log_level=settings.log_level,
        )

    # -- helpers ----------------------------------------------------------------------------

    async def _fail(self, job: Job, message: str) -> None:
        failed = await self._store.mark_failed(job.id, message)
        await self._remove_state(job.id)
        if failed is not None:
            await self._emit("job_failed", failed, message)

    async def _emit(self, event: str, job: Job, *args: Any) -> None:
        """Call a JobEvents method; its failure is logged and does not stop the job."""
        try:
            await getattr(self._events, event)(job, *args)
        except asyncio.CancelledError:
            raise
        except Exception:  # the Discord layer failing to post must not stop generation
            log.exception("JobEvents.%s failed for job %d", event, job.id)

    def _state_path(self, job_id: int) -> Path:
        return self.state_dir / f"job-{job_id}.pt"

    async def _remove_state(self, job_id: int) -> None:
        await asyncio.to_thread(self._state_path(job_id).unlink, missing_ok=True)

    def _remove_stale_states(self, keep: set[int]) -> None:
        """Delete state files of jobs that are no longer queued, and partial temporary files."""
        if not self.state_dir.is_dir():
            return
        for path in self.state_dir.iterdir():
            match = STATE_FILE_PATTERN.fullmatch(path.name)
            if match is not None and int(match[1]) in keep:
                continue
            if match is not None or path.name.startswith(".job-"):
                log.info("Removing stale job state %s", path)
                path.unlink(missing_ok=True)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    temporary.replace(path)
