"""The generator worker: a child process that keeps the models loaded and runs one job at a time.

The executor starts :func:`worker_main` with ``multiprocessing``'s spawn context and talks to
it over a pipe with plain dicts, listed below. torch and the generator are imported only
inside the child, so the bot process never loads them. Every exception a job raises becomes
a ``failed`` message. Only a hard crash (SIGKILL, a segfault) ends the process, and then the
executor starts a new one.

Messages from the executor:
    ``{"type": "run", "job_id", "request", "state_path", "resume"}``, ``{"type": "measure"}``
    (time a warm-up generation, see :class:`_WarmUpClock`) and ``{"type": "exit"}``.
The worker stops its job as for a shutdown (``stopped``) and exits when it gets SIGTERM.
When the bot process is gone, the worker's next message fails with a broken pipe and the
worker exits, so a bot killed with SIGKILL leaves no worker running. SIGINT is ignored,
because the bot handles Ctrl+C for it.

Messages to the executor:
    - ``device`` (the resolved device) or ``fatal`` (no usable device, with the ``available``
      ones; the worker exits);
    - ``ready`` or ``models_failed`` (after loading models; a registered model that is not in
      the models directory yet is downloaded first);
    - ``speed`` (the reply to ``measure``: ``seconds_per_iteration`` at ``width``×``height`` with
      ``cutn`` cutouts, or None if the warm-up failed);
    - ``started`` (with ``resumed_at``);
    - ``progress`` (iteration, total, PNG bytes or None, ``iterations_per_s``);
    - ``state`` (a resumable state was saved at ``iteration``);
    - one final message per job: ``done`` (PNG bytes, ``duration_s``), ``failed`` (``kind``
      and a user-facing ``message``), ``cancelled``, or ``stopped`` (for a shutdown).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

    from generator import GenerationRequest, Models, Progress

__all__ = ["WorkerConfig", "worker_main"]

log = logging.getLogger(__name__)

# Progress messages without a picture are sent at most this often (seconds).
PROGRESS_MESSAGE_INTERVAL_S = 1.0

INTERNAL_ERROR = (
    "Something went wrong while making this picture (job {job_id}). The bot owner can find "
    "the details in the bot's log; you can try again."
)
MODEL_ERROR = (
    "The bot could not load its image models, so no picture can be made right now. The bot "
    "owner can find the details in the bot's log."
)
# The warm-up that ``measure`` times: (width, height, cutouts) per device type, the default
# sizes of the CPU draft and GPU presets, so the figure fits what most jobs ask for.
WARM_UP_SIZES: dict[str, tuple[int, int, int]] = {
    "cpu": (128, 128, 16),
    "cuda": (256, 256, 32),
}
# A first iteration this long (seconds) is the measurement: its one-off costs (embedding the
# prompt, first calls into the libraries) are small beside it. After a shorter one, the
# iterations that follow are timed until they add up to WARM_UP_TIMED_S or WARM_UP_MAX.
WARM_UP_LONG_FIRST_S = 4.0
WARM_UP_TIMED_S = 0.5
WARM_UP_MAX = 20
OUT_OF_MEMORY = (
    "The generator ran out of memory making a {width}x{height} picture with {cutn} cutouts. "
    "Try a smaller size (for example {half_width}x{half_height}) or fewer iterations."
)


@dataclass(frozen=True)
class WorkerConfig:
    """The operator settings a worker needs, picklable for the spawn start method."""

    device: str
    vqgan: str
    clip_models: tuple[str, ...]
    models_dir: str
    threads: int | None
    log_level: str


class _JobLogFilter(logging.Filter):
    """Add the running job's id to every log record of the worker process."""

    job_id: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        record.job = "-" if self.job_id is None else str(self.job_id)
        return True


class _CancelCheck:
    """The ``cancel`` that ``generate`` polls, set by a cancel or any reason to stop the worker."""

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker

    def is_set(self) -> bool:
        return self._worker.cancel_event.is_set() or self._worker.should_stop()


def worker_main(
    connection: Connection, cancel_event: Event, stop_event: Event, config: WorkerConfig
) -> None:
    """Run jobs received on ``connection`` until an ``exit`` message or the pipe closes.

    ``cancel_event`` stops the running job (reported as ``cancelled``); ``stop_event`` stops
    it for a shutdown (reported as ``stopped``, its last saved state kept) and ends the worker.
    """
    # The executor starts the worker without the token; a worker started another way drops
    # it here, since the worker never talks to Discord.
    os.environ.pop("DISCORD_TOKEN", None)

    # Ctrl+C in a terminal reaches the whole process group. The bot's graceful stop()
    # handles it for the worker, so the worker must not die of it mid-job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    job_filter = _configure_logging(config.log_level)
    worker = _Worker(connection, cancel_event, stop_event, config, job_filter)
    signal.signal(signal.SIGTERM, worker.on_sigterm)
    try:
        worker.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("The executor closed the pipe; the worker exits.")
    finally:
        connection.close()


def _configure_logging(level: str) -> _JobLogFilter:
    job_filter = _JobLogFilter()
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-8s %(name)s [worker job %(job)s]: %(message)s")
    )
    handler.addFilter(job_filter)
    if level != "DEBUG":
        handler.addFilter(_drop_root_info)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return job_filter


def _drop_root_info(record: logging.LogRecord) -> bool:
    """Keep a record unless it is below WARNING and comes from the root logger.

    open_clip logs each step of building a model through the root logger at INFO, about ten
    lines per CLIP. Our own modules log through named loggers.
    """
    return record.name != "root" or record.levelno >= logging.WARNING


class _Worker:
    def __init__(
        self,
        connection: Connection,
        cancel_event: Event,
        stop_event: Event,
        config: WorkerConfig,
        job_filter: _JobLogFilter,
    ) -> None:
        self.connection = connection
        self.cancel_event = cancel_event
        self.stop_event = stop_event
        self.config = config
        self.job_filter = job_filter
        self.models: Models | None = None
        self.models_key: tuple[str, tuple[str, ...]] | None = None
        self.job_running: bool = False
        self.terminate_requested: bool = False

    def should_stop(self) -> bool:
        """Return whether the executor set ``stop_event`` or SIGTERM arrived.

        Then the worker stops its job as for a shutdown and exits.
        """
        return self.stop_event.is_set() or self.terminate_requested

    def on_sigterm(self, signum: int, frame: object) -> None:
        """Exit at once when idle; stop the running job at its next iteration otherwise."""
        # A flag, not stop_event.set(): that takes a lock the interrupted code may hold.
        self.terminate_requested = True
        if not self.job_running:
            raise SystemExit(0)

    def send(self, message_type: str, **fields: Any) -> None:
        self.connection.send({"type": message_type, **fields})

    def serve(self) -> None:
        # Heavy imports happen here, in the child only.
        import torch

        from generator import ModelError, resolve_device

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        try:
            self.device = resolve_device(self.config.device)
        except ModelError as error:
            log.error("Unusable device %r: %s", self.config.device, error)
            self.send("fatal", message=str(error), available=_available_devices())
            return
        self.send("device", device=str(self.device))
        # A failure is reported as models_failed, and each job tries loading again.
        with contextlib.suppress(ModelError):
            self.load_models(self.config.vqgan, self.config.clip_models)

        while not self.should_stop():
            message = self.connection.recv()
            if message["type"] == "exit":
                break
            if message["type"] == "run":
                self.run_job(message)
            elif message["type"] == "measure":
                self.send("speed", **self.measure_speed())
        log.info("The worker exits.")

    def load_models(self, vqgan: str, clip_models: tuple[str, ...]) -> Models:
        """Return the warm models, loading them if the request names other ones.

        Raises:
            ModelError: loading failed (reported as ``models_failed`` too).
        """
        from generator import ModelError, load_models

        key = (vqgan, tuple(clip_models))
        if self.models is not None and self.models_key == key:
            return self.models

        started = time.perf_counter()
        self.models = None
        try:
            self.models = load_models(
                vqgan, list(clip_models), self.device, models_dir=Path(self.config.models_dir)
            )
        except ModelError as error:
            log.error("Loading models %s + %s failed: %s", vqgan, ", ".join(clip_models), error)
            self.send("models_failed", message=str(error))
            raise
        self.models_key = key
        log.info("Loaded models in %.1f s on %s", time.perf_counter() - started, self.device)
        self.send("ready", vqgan=vqgan, clip_models=list(clip_models))
        return self.models

    def measure_speed(self) -> dict[str, Any]:
        """Time a warm-up generation with the configured models; return the ``speed`` fields.

        ``seconds_per_iteration`` is None when the warm-up failed or was stopped; the
        failure is logged and the worker goes on.
        """
        from generator import GenerationCancelled, GenerationRequest, Prompt, generate

        width, height, cutn = WARM_UP_SIZES.get(self.device.type, WARM_UP_SIZES["cuda"])
        fields: dict[str, Any] = {"width": width, "height": height, "cutn": cutn}
        request = GenerationRequest(
            prompts=[Prompt("a warm-up picture")],
            seed=0,
            width=width,
            height=height,
            iterations=WARM_UP_MAX,
            cutn=cutn,
            vqgan=self.config.vqgan,
            clip=tuple(self.config.clip_models),
        )
        clock = _WarmUpClock(self)
        try:
            generate(
                request,
                progress=clock.tick,
                cancel=clock,
                models=self.load_models(request.vqgan, request.clip),
                threads=self.config.threads,
            )
        except GenerationCancelled:
            if not clock.enough():
                log.info("The warm-up was stopped")
                return {**fields, "seconds_per_iteration": None}
        except Exception as error:  # a failed warm-up only costs the first estimate
            log.warning("The warm-up generation failed: %s", error, exc_info=True)
            return {**fields, "seconds_per_iteration": None}
        finally:
            self.free_memory()

        seconds = clock.seconds_per_iteration()
        log.info(
            "Warm-up: %.2f s per iteration at %dx%d with %d cutouts", seconds, width, height, cutn
        )
        return {**fields, "seconds_per_iteration": seconds}

    def run_job(self, message: dict[str, Any]) -> None:
        """Run one job and send exactly one final message for it."""
        from generator import (
            GenerationCancelled,
            GenerationRequest,
            ModelError,
            PromptError,
            RequestError,
        )

        job_id = message["job_id"]
        self.job_filter.job_id = job_id
        self.job_running = True
        request: GenerationRequest | None = None
        try:
            request = GenerationRequest.from_dict(message["request"])
            models = self.load_models(request.vqgan, request.clip)
            resume = self.load_resume(message) if message.get("resume") else None
            resumed_at = None if resume is None else int(resume["iteration"])
            self.send("started", job_id=job_id, resumed_at=resumed_at)
            self.generate(job_id, request, models, resume, message["state_path"])
        except GenerationCancelled as cancelled:
            final = "stopped" if self.should_stop() else "cancelled"
            log.info("Job %s after %d iterations", final, cancelled.iteration)
            self.send(final, job_id=job_id, iteration=cancelled.iteration)
        except ModelError:
            self.send("failed", job_id=job_id, kind="model", message=MODEL_ERROR)
        except (RequestError, PromptError) as error:
            # Their messages are written for users.
            log.info("Job rejected: %s", error)
            self.send("failed", job_id=job_id, kind="invalid", message=str(error))
        except Exception as error:  # every other failure of one job must not end the worker
            if request is not None and _is_out_of_memory(error):
                log.warning("Out of memory: %s", error)
                self.free_memory()
                self.send("failed", job_id=job_id, kind="oom", message=_oom_message(request))
            else:
                log.exception("Job failed")
                internal = INTERNAL_ERROR.format(job_id=job_id)
                self.send("failed", job_id=job_id, kind="error", message=internal)
        finally:
            self.job_filter.job_id = None
            self.job_running = False

    def load_resume(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Load the job's saved state, or return None (start over) if it cannot be read."""
        from generator import load_state

        path = Path(message["state_path"])
        try:
            return load_state(path)
        except (OSError, ValueError, RuntimeError) as error:
            log.warning("Saved state %s is unreadable, starting over: %s", path, error)
            return None

    def generate(
        self,
        job_id: int,
        request: GenerationRequest,
        models: Models,
        resume: dict[str, Any] | None,
        state_path: str,
    ) -> None:
        from generator import generate, save_state
        from generator.png import generation_metadata, png_bytes

        started = time.perf_counter()
        reporter = _ProgressReporter(self, job_id)

        def on_state(state: dict[str, Any]) -> None:
            save_state(state, state_path)
            self.send("state", job_id=job_id, iteration=int(state["iteration"]), path=state_path)

        image = generate(
            request,
            progress=reporter,
            cancel=_CancelCheck(self),
            models=models,
            resume=resume,
            on_state=on_state,
            threads=self.config.threads,
        )
        png = png_bytes(image, generation_metadata(request, *image.size))
        duration = time.perf_counter() - started
        self.send("done", job_id=job_id, png=png, duration_s=duration)

    def free_memory(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _WarmUpClock:
    """Times warm-up iterations and says, as the warm-up's ``cancel``, when it has enough.

    The first iteration is the measurement when it takes ``WARM_UP_LONG_FIRST_S`` or more
    (the real models on a CPU: one iteration of about 8 s on 2 cores). Otherwise (a GPU,
    tiny models) it carries one-off costs, such as kernel selection, that would dominate, so
    the iterations after it are timed until they add up to ``WARM_UP_TIMED_S``.
    """

    def __init__(self, worker: _Worker) -> None:
        self._worker = worker
        self.times: list[float] = [time.perf_counter()]

    def tick(self, progress: Progress) -> None:
        self.times.append(time.perf_counter())

    def enough(self) -> bool:
        done = len(self.times) - 1
        if done == 0:
            return False
        if self.times[1] - self.times[0] >= WARM_UP_LONG_FIRST_S:
            return True
        return done >= 2 and (self.times[-1] - self.times[1] >= WARM_UP_TIMED_S)

    def is_set(self) -> bool:
        return self.enough() or self._worker.cancel_event.is_set() or self._worker.should_stop()

    def seconds_per_iteration(self) -> float:
        """Return the measured seconds per iteration; call once ``enough()`` or all ran."""
        if len(self.times) == 2:
            return self.times[1] - self.times[0]
        return (self.times[-1] - self.times[1]) / (len(self.times) - 2)


class _ProgressReporter:
    """The ``progress`` callback: forwards pictures, the last iteration, and a heartbeat."""

    def __init__(self, worker: _Worker, job_id: int) -> None:
        self.worker = worker
        self.job_id = job_id
        self.first: tuple[int, float] | None = None
        self.last_sent = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.perf_counter()
        if self.first is None:
            # The first iteration also embeds the prompts, so speed is measured after it.
            self.first = (progress.iteration, now)
        done_since_first = progress.iteration - self.first[0]
        rate = done_since_first / (now - self.first[1]) if done_since_first else None

        final = progress.iteration == progress.total
        recent = now - self.last_sent < PROGRESS_MESSAGE_INTERVAL_S
        if progress.image is None and not final and recent:
            return
        self.last_sent = now
        png = None if progress.image is None else _encode_png(progress.image)
        self.worker.send(
            "progress",
            job_id=self.job_id,
            iteration=progress.iteration,
            total=progress.total,
            png=png,
            iterations_per_s=rate,
        )


def _available_devices() -> list[str]:
    """Return the devices this machine offers, as IMAGINE_DEVICE spells them."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return devices


def _encode_png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    # The CPU allocator raises a plain RuntimeError.
    text = str(error).lower()
    return isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _oom_message(request: GenerationRequest) -> str:
    return OUT_OF_MEMORY.format(
        width=request.width,
        height=request.height,
        cutn=request.cutn,
        half_width=max(16, request.width // 2 // 16 * 16),
        half_height=max(16, request.height // 2 // 16 * 16),
    )
