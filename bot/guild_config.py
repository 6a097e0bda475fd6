"""Per-guild settings that server admins change with /config, bounded by the operator's caps.

``CONFIG_KEYS`` is the table of keys: type, default, bounds and description. Sizes are the
longest side of the picture in pixels. Defaults depend on the device: on a CPU a 256-pixel
picture takes over 20 s per iteration, so CPU hosts default to the smaller draft preset
``CPU_DRAFT_PRESET``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from bot.settings import Settings

__all__ = [
    "CONFIG_KEYS",
    "CPU_DRAFT_PRESET",
    "GPU_PRESET",
    "ConfigError",
    "ConfigKey",
    "default_values",
    "effective",
    "find_banned_word",
    "format_value",
    "is_channel_allowed",
    "parse_value",
]

MIN_SIDE = 32
MAX_CUTN = 128
MAX_LIST_ITEMS = 100
MAX_WORD_LENGTH = 64

# Defaults of the keys that depend on the device (sizes in pixels, longest side).
GPU_PRESET: dict[str, int] = {
    "default_size": 256,
    "default_iterations": 300,
    "cutn": 32,
    "progress_interval": 25,
}
CPU_DRAFT_PRESET: dict[str, int] = {
    "default_size": 128,
    "default_iterations": 50,
    "cutn": 16,
    "progress_interval": 10,
}

Kind = Literal["int", "channels", "words"]


class ConfigError(ValueError):
    """An invalid /config key or value. The message states the allowed keys or values."""


@dataclass(frozen=True)
class ConfigKey:
    """One per-guild setting.

    ``default(settings, cpu)`` gives the value a guild has until it changes it.
    ``maximum(settings)`` gives the upper bound of an ``int`` key from the operator's caps.
    """

    name: str
    kind: Kind
    description: str
    default: Callable[[Settings, bool], Any]
    minimum: int = 0
    maximum: Callable[[Settings], int] | None = None
    unit: str = ""

    def bounds(self, settings: Settings) -> tuple[int, int]:
        """Return the inclusive range allowed for an ``int`` key under these settings."""
        high = self.maximum(settings) if self.maximum else 2**31 - 1
        return self.minimum, max(self.minimum, high)


def _preset(key: str) -> Callable[[Settings, bool], int]:
    return lambda settings, cpu: (CPU_DRAFT_PRESET if cpu else GPU_PRESET)[key]


CONFIG_KEYS: dict[str, ConfigKey] = {
    key.name: key
    for key in (
        ConfigKey(
            "default_iterations",
            "int",
            "Iterations a picture gets when the prompt has no --iter.",
            _preset("default_iterations"),
            minimum=1,
            maximum=lambda s: s.max_iterations,
        ),
        ConfigKey(
            "max_iterations",
            "int",
            "Most iterations anyone may ask for with --iter.",
            lambda s, cpu: s.max_iterations,
            minimum=1,
            maximum=lambda s: s.max_iterations,
        ),
        ConfigKey(
            "default_size",
            "int",
            "Longest side of a picture when the prompt has no size, in pixels.",
            _preset("default_size"),
            minimum=MIN_SIDE,
            maximum=lambda s: s.max_size,
            unit="pixels",
        ),
        ConfigKey(
            "max_size",
            "int",
            "Largest longest side anyone may ask for, in pixels.",
            lambda s, cpu: s.max_size,
            minimum=MIN_SIDE,
            maximum=lambda s: s.max_size,
            unit="pixels",
        ),
        ConfigKey(
            "cutn",
            "int",
            "Random crops CLIP scores per iteration: more crops, better pictures, slower steps.",
            _preset("cutn"),
            minimum=1,
            maximum=lambda s: MAX_CUTN,
        ),
        ConfigKey(
            "progress_interval",
            "int",
            "Iterations between progress pictures (and between saved states for resuming).",
            _preset("progress_interval"),
            minimum=1,
            maximum=lambda s: s.max_iterations,
        ),
        ConfigKey(
            "max_jobs_per_user",
            "int",
            "Most pictures one person may have queued or running at once.",
            lambda s, cpu: min(3, s.max_jobs_per_user),
            minimum=1,
            maximum=lambda s: s.max_jobs_per_user,
        ),
        ConfigKey(
            "allowed_channels",
            "channels",
            "Channels where /imagine works, as channel mentions; empty or 'all' means every "
            "channel.",
            lambda s, cpu: [],
        ),
        ConfigKey(
            "banned_words",
            "words",
            "Comma-separated words or phrases that prompts may not contain, matched as whole "
            "words ignoring case (banning 'war' does not ban 'warm'); empty or 'none' "
            "for no filter.",
            lambda s, cpu: [],
        ),
    )
}


def default_values(settings: Settings, cpu: bool = False) -> dict[str, Any]:
    """Return every key's default for a guild that changed nothing."""
    values = {name: key.default(settings, cpu) for name, key in CONFIG_KEYS.items()}
    return _clamp_all(values, settings)


def effective(
    guild_values: Mapping[str, Any], settings: Settings, cpu: bool = False
) -> dict[str, Any]:
    """Merge a guild's stored values over the defaults, within today's caps.

    Stored values above a cap the operator has lowered since are clamped; unknown keys
    (from an older release) are ignored. ``default_iterations`` and ``default_size`` never
    exceed the guild's own maximums.
    """
    values = {name: key.default(settings, cpu) for name, key in CONFIG_KEYS.items()}
    for name, value in guild_values.items():
        if name in CONFIG_KEYS:
            values[name] = value
    return _clamp_all(values, settings)


def _clamp_all(values: dict[str, Any], settings: Settings) -> dict[str, Any]:
    for name, key in CONFIG_KEYS.items():
        if key.kind == "int":
            low, high = key.bounds(settings)
            values[name] = min(max(int(values[name]), low), high)
    values["default_iterations"] = min(values["default_iterations"], values["max_iterations"])
    values["default_size"] = min(values["default_size"], values["max_size"])
    return values


def parse_value(key: str, text: str, settings: Settings) -> Any:
    """Parse the text an admin typed for ``key`` into the value to store.

    Raises:
        ConfigError: the key is unknown (the message lists the keys) or the value is invalid
            (the message gives the allowed range or form).
    """
    config_key = CONFIG_KEYS.get(key.strip().lower())
    if config_key is None:
        raise ConfigError(
            f"Unknown setting {key!r}. Settings you can change: {', '.join(CONFIG_KEYS)}."
        )
    parsers = {"int": _parse_int, "channels": _parse_channels, "words": _parse_words}
    return parsers[config_key.kind](config_key, text.strip(), settings)


def _parse_int(key: ConfigKey, text: str, settings: Settings) -> int:
    low, high = key.bounds(settings)
    unit = f" {key.unit}" if key.unit else ""
    allowed = f"{key.name} must be a whole number from {low} to {high}{unit}"
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{allowed}; {text!r} is not a whole number.") from None
    if not low <= value <= high:
        raise ConfigError(f"{allowed}; {value} is out of range.")
    return value


_CHANNEL_PATTERN = re.compile(r"<#(\d+)>|(\d+)")


def _parse_channels(key: ConfigKey, text: str, settings: Settings) -> list[int]:
    if text.lower() in ("", "all", "none"):
        return []
    channels: list[int] = []
    for item in re.split(r"[\s,]+", text):
        if not item:
            continue
        match = _CHANNEL_PATTERN.fullmatch(item)
        if match is None:
            raise ConfigError(
                f"{item!r} is not a channel: mention channels like #general (Discord turns "
                "that into <#id>) or give their ids, separated by spaces or commas; "
                "'all' allows every channel."
            )
        channel_id = int(match[1] or match[2])
        if channel_id not in channels:
            channels.append(channel_id)
    _check_list_length(key, channels)
    return channels


def _parse_words(key: ConfigKey, text: str, settings: Settings) -> list[str]:
    if text.lower() in ("", "none"):
        return []
    words: list[str] = []
    for item in text.split(","):
        word = " ".join(item.split()).casefold()
        if not word:
            continue
        if len(word) > MAX_WORD_LENGTH:
            raise ConfigError(
                f"{item.strip()[:20]!r}... is too long for {key.name}: each word or phrase "
                f"may have at most {MAX_WORD_LENGTH} characters."
            )
        if word not in words:
            words.append(word)
    _check_list_length(key, words)
    return words


def _check_list_length(key: ConfigKey, items: list[Any]) -> None:
    if len(items) > MAX_LIST_ITEMS:
        raise ConfigError(
            f"{key.name} may hold at most {MAX_LIST_ITEMS} entries; you gave {len(items)}."
        )


def format_value(key: str, value: Any) -> str:
    """Render a stored or effective value the way /config shows it."""
    config_key = CONFIG_KEYS[key]
    if config_key.kind == "channels":
        return " ".join(f"<#{channel_id}>" for channel_id in value) or "all channels"
    if config_key.kind == "words":
        return ", ".join(value) or "none"
    return f"{value} {config_key.unit}".strip()


def is_channel_allowed(config: Mapping[str, Any], channel_id: int) -> bool:
    """Return whether /imagine may run in ``channel_id`` under an effective config."""
    allowed = config["allowed_channels"]
    return not allowed or channel_id in allowed


def find_banned_word(config: Mapping[str, Any], prompt: str) -> str | None:
    """Return the first banned word or phrase found in ``prompt`` as a whole word, or None.

    Matching ignores case and runs of whitespace.
    """
    text = " ".join(prompt.split()).casefold()
    for word in config["banned_words"]:
        if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text):
            return word
    return None
