"""Operator settings, read once at start-up from environment variables.

Every variable is documented in the README and in ``.env.example``. An invalid value stops
start-up with a :class:`SettingsError` that names the variable, the value and what is allowed.
The bot token is never part of an error message or of ``repr(settings)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ENVIRONMENT_VARIABLES", "Settings", "SettingsError"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# MODEL/PRETRAINED, where PRETRAINED is a tag or a path that may itself contain slashes.
CLIP_SPEC_PATTERN = re.compile(r"[^/\s][^/]*/\S.*")
# Settings field -> (environment variable, smallest and largest allowed value).
WHOLE_NUMBER_RANGES: dict[str, tuple[str, int, int]] = {
    "max_size": ("IMAGINE_MAX_SIZE", 16, 4096),
    "max_iterations": ("IMAGINE_MAX_ITERATIONS", 1, 100_000),
    "max_queue": ("IMAGINE_MAX_QUEUE", 1, 100_000),
    "max_jobs_per_user": ("IMAGINE_MAX_JOBS_PER_USER", 1, 1000),
    "threads": ("IMAGINE_THREADS", 1, 1024),
}
TOKEN_HELP = (
    "DISCORD_TOKEN is not set. Create an application at "
    "https://discord.com/developers/applications, open its Bot page, press 'Reset Token', "
    "and put the token in DISCORD_TOKEN "
    "(or run `python -m bot --sandbox` to try the bot without a token)."
)


class SettingsError(ValueError):
    """An environment variable contains a value the bot cannot use."""


@dataclass(frozen=True)
class Settings:
    """Configuration of one bot process, chosen by its operator.

    Sizes are in pixels, ``max_size`` bounds the longest side of an image. Per-guild settings
    (``/config``) are validated against these hard caps.
    """

    token: str | None = field(default=None, repr=False)
    data_dir: Path = Path("data")
    models_dir: Path | None = None
    device: str = "auto"
    clip_models: tuple[str, ...] = ("ViT-B-32/openai",)
    vqgan_model: str = "vqgan_imagenet_f16_16384"
    max_size: int = 512
    max_iterations: int = 1000
    max_queue: int = 100
    max_jobs_per_user: int = 10
    owner_ids: frozenset[int] = frozenset()
    log_level: str = "INFO"
    threads: int | None = None

    def __post_init__(self) -> None:
        # Accept plain strings and lists from callers that build Settings by hand.
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        models_dir = Path(self.models_dir) if self.models_dir else Path(self.data_dir) / "models"
        object.__setattr__(self, "models_dir", models_dir)
        if isinstance(self.clip_models, str):
            object.__setattr__(self, "clip_models", _split_list(self.clip_models))
        object.__setattr__(self, "clip_models", tuple(self.clip_models))
        object.__setattr__(self, "owner_ids", frozenset(int(i) for i in self.owner_ids))
        object.__setattr__(self, "log_level", self.log_level.upper())
        self.validate()

    @property
    def clip_model(self) -> str:
        """The CLIP models as one comma-separated string, as ``IMAGINE_CLIP_MODEL`` takes them."""
        return ",".join(self.clip_models)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "imagine.sqlite3"

    def validate(self) -> None:
        """Raise :class:`SettingsError` for the first field with an unusable value."""
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise _invalid("IMAGINE_DEVICE", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        clip_specs_valid = all(CLIP_SPEC_PATTERN.fullmatch(spec) for spec in self.clip_models)
        if not self.clip_models or not clip_specs_valid:
            raise _invalid(
                "IMAGINE_CLIP_MODEL", self.clip_model, "MODEL/PRETRAINED, e.g. 'ViT-B-32/openai'"
            )
        if not self.vqgan_model.strip():
            raise _invalid("IMAGINE_VQGAN_MODEL", self.vqgan_model, "a registry name or a path")
        for name, (variable, low, high) in WHOLE_NUMBER_RANGES.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise _invalid(variable, value, f"a whole number from {low} to {high}")
        if self.log_level not in LOG_LEVELS:
            raise _invalid("IMAGINE_LOG_LEVEL", self.log_level, ", ".join(LOG_LEVELS))

    def require_token(self) -> str:
        """Return the bot token, or raise :class:`SettingsError` saying how to get one."""
        if not self.token:
            raise SettingsError(TOKEN_HELP)
        return self.token

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables; unset variables keep their defaults.

        Raises:
            SettingsError: a variable is set to a value that cannot be used.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for variable, (name, convert) in ENVIRONMENT_VARIABLES.items():
            raw = environ.get(variable, "").strip()
            if not raw:
                continue
            try:
                values[name] = convert(raw)
            except ValueError as error:
                # The token is never converted, so no branch here can echo it.
                raise SettingsError(f"{variable}={raw!r} is invalid: {error}") from None
        return cls(**values)


def _split_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _whole_number(field_name: str) -> Callable[[str], int]:
    _, low, high = WHOLE_NUMBER_RANGES[field_name]

    def parse(raw: str) -> int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected a whole number from {low} to {high}.") from None

    return parse


def _parse_owner_ids(raw: str) -> frozenset[int]:
    ids = set()
    for item in _split_list(raw):
        if not item.isdigit():
            raise ValueError(f"{item!r} is not a Discord user id (a number like 1234567890)")
        ids.add(int(item))
    return frozenset(ids)


def _invalid(variable: str, value: object, allowed: str) -> SettingsError:
    return SettingsError(f"{variable}={value!r} is invalid; allowed: {allowed}.")


# Environment variable -> (Settings field, conversion of the raw text).
ENVIRONMENT_VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "DISCORD_TOKEN": ("token", str),
    "IMAGINE_DATA_DIR": ("data_dir", Path),
    "IMAGINE_MODELS_DIR": ("models_dir", Path),
    "IMAGINE_DEVICE": ("device", str.lower),
    "IMAGINE_CLIP_MODEL": ("clip_models", _split_list),
    "IMAGINE_VQGAN_MODEL": ("vqgan_model", str),
    "IMAGINE_MAX_SIZE": ("max_size", _whole_number("max_size")),
    "IMAGINE_MAX_ITERATIONS": ("max_iterations", _whole_number("max_iterations")),
    "IMAGINE_MAX_QUEUE": ("max_queue", _whole_number("max_queue")),
    "IMAGINE_MAX_JOBS_PER_USER": ("max_jobs_per_user", _whole_number("max_jobs_per_user")),
    "IMAGINE_OWNER_IDS": ("owner_ids", _parse_owner_ids),
    "IMAGINE_LOG_LEVEL": ("log_level", str.upper),
    "IMAGINE_THREADS": ("threads", _whole_number("threads")),
}


def configure_logging(settings: Settings) -> None:
    """Set up root logging at the operator's level, with a filter that masks the token."""
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-8s %(name)s: %(message)s",
    )
    if settings.token:
        redactor = TokenRedactor(settings.token)
        for handler in logging.getLogger().handlers:
            handler.addFilter(redactor)


class TokenRedactor(logging.Filter):
    """Replace secrets with ``[token]`` in every record a handler formats.

    The secrets are the bot token and the tokens of interactions and webhooks, which
    discord.py logs at DEBUG level in request URLs and gateway payloads. An interaction
    token lets its holder send responses and followups as the bot for 15 minutes.
    """

    # "/webhooks/<id>/<token>" and "/interactions/<id>/<token>" in URLs, and a "token" key
    # in a JSON payload or in a Python dict's repr.
    _OTHER_TOKENS = re.compile(
        r"(?P<prefix>/(?:webhooks|interactions)/\d+/|['\"]token['\"]:\s*['\"])[\w.-]+"
    )

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def redact(self, text: str) -> str:
        """Return ``text`` with the bot token and any interaction or webhook token masked."""
        if self._token in text:
            text = text.replace(self._token, "[token]")
        return self._OTHER_TOKENS.sub(r"\g<prefix>[token]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = self.redact(message)
        if redacted != message:
            record.msg = redacted
            record.args = None

        # Formatters reuse a record's cached exc_text, so masking it here also masks the
        # traceback that every handler prints.
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True
