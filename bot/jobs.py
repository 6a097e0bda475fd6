"""Job records shared by the store, the executor and the Discord layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "Job", "JobEvents", "JobState", "NewJob"]

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
ACTIVE_STATES: tuple[JobState, ...] = ("queued", "running")
FINAL_STATES: tuple[JobState, ...] = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class NewJob:
    """A generation a user asked for, before it has an id.

    ``request`` is ``GenerationRequest.to_dict()``; ``prompt`` is the text as the user typed
    it, flags included. ``guild_id`` is None for direct messages.
    """

    guild_id: int | None
    channel_id: int
    user_id: int
    prompt: str
    request: dict[str, Any]


@dataclass(frozen=True)
class Job:
    """One row of the ``jobs`` table.

    Times are Unix timestamps in seconds. ``attempts`` counts interruptions by a crash or
    restart. ``saved_iteration`` is the iteration of the last resumable state written to
    ``state_path``. ``error`` is the user-facing reason of a failure. A cancelled job with a
    ``started_at`` was running when it was cancelled.
    """

    id: int
    guild_id: int | None
    channel_id: int
    user_id: int
    prompt: str
    request: dict[str, Any]
    state: JobState
    round: int
    priority: int
    attempts: int
    saved_iteration: int | None
    state_path: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    message_id: int | None
    error: str | None
    result_path: str | None

    @property
    def iterations(self) -> int:
        """The number of iterations in the request."""
        return int(self.request.get("iterations", 0))


class JobEvents(Protocol):
    """Job events from the executor, implemented by the Discord layer.

    Every method is awaited on the bot's event loop; an exception it raises is logged and
    does not stop the job. ``message`` in ``job_failed`` is meant for users.
    """

    async def job_started(self, job: Job, resumed_at: int | None) -> None: ...

    async def job_progress(
        self, job: Job, iteration: int, total: int, png: bytes | None
    ) -> None: ...

    async def job_finished(self, job: Job, png: bytes, duration_s: float) -> None: ...

    async def job_failed(self, job: Job, message: str) -> None: ...

    async def job_cancelled(self, job: Job) -> None: ...
