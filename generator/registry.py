"""The table of downloadable VQGAN models, read from ``registry.json``.

Each model has a taming YAML config and a checkpoint. For each file the table
lists download URLs (mirrors, tried in order), the byte size and the SHA-256
digest where known. A value listed in the file's ``unverified`` array could not
be checked against the real file: it is null when unknown, or was copied from
another project's manifest. Downloads enforce verified values and only warn
when an unverified one differs.

A model called NAME is stored as ``<models_dir>/NAME.ckpt`` with its config
beside it as ``<models_dir>/NAME.yaml``, the same layout a local path uses.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from generator.errors import ModelError

REGISTRY_PATH = Path(__file__).with_name("registry.json")
MODELS_DIR_VARIABLE = "IMAGINE_MODELS_DIR"

FILE_KINDS = ("config", "checkpoint")
FILE_SUFFIXES = {"config": ".yaml", "checkpoint": ".ckpt"}
CHECKABLE_FIELDS = frozenset({"size", "sha256"})
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def default_models_dir() -> Path:
    """Return $IMAGINE_MODELS_DIR, or ``data/models`` under the current directory."""
    return configured_models_dir() or Path("data/models")


def configured_models_dir() -> Path | None:
    """Return $IMAGINE_MODELS_DIR when it is set and not empty, else None."""
    value = os.environ.get(MODELS_DIR_VARIABLE, "")
    return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file of a model: its mirrors and what the bytes should be."""

    model: str
    kind: str
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None
    unverified: frozenset[str]

    @property
    def filename(self) -> str:
        """Name of the file inside models_dir, for example ``NAME.ckpt``."""
        return self.model + FILE_SUFFIXES[self.kind]

    def is_enforced(self, field_name: str) -> bool:
        """Return True if a known value of `field_name` ("size" or "sha256") must match exactly."""
        return getattr(self, field_name) is not None and field_name not in self.unverified


@dataclass(frozen=True)
class ModelEntry:
    """A named VQGAN in the registry."""

    name: str
    description: str
    quantizer: str
    factor: int
    n_embed: int
    config: RemoteFile
    checkpoint: RemoteFile

    @property
    def files(self) -> tuple[RemoteFile, RemoteFile]:
        """The config and the checkpoint, in download order."""
        return (self.config, self.checkpoint)

    def paths(self, models_dir: Path) -> tuple[Path, Path]:
        """Return (checkpoint path, config path) of this model inside models_dir."""
        directory = Path(models_dir)
        return directory / self.checkpoint.filename, directory / self.config.filename


def _parse_file(model: str, kind: str, data: dict[str, Any]) -> RemoteFile:
    where = f"registry entry {model!r}, file {kind!r}"
    urls = data.get("urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ModelError(f"{where}: 'urls' must be a non-empty list of strings.")

    size = data.get("size")
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ModelError(f"{where}: 'size' must be a positive integer or null, not {size!r}.")

    sha256 = data.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and _SHA256_PATTERN.match(sha256)):
        raise ModelError(f"{where}: 'sha256' must be 64 lowercase hex digits or null.")

    unverified = frozenset(data.get("unverified", []))
    if not unverified <= CHECKABLE_FIELDS:
        raise ModelError(f"{where}: 'unverified' may only list {sorted(CHECKABLE_FIELDS)}.")

    return RemoteFile(model, kind, tuple(urls), size, sha256, unverified)


def _parse_entry(name: str, data: dict[str, Any]) -> ModelEntry:
    files = data.get("files", {})
    missing = [kind for kind in FILE_KINDS if kind not in files]
    if missing:
        raise ModelError(f"registry entry {name!r} lacks files: {', '.join(missing)}.")
    return ModelEntry(
        name=name,
        description=str(data.get("description", "")),
        quantizer=str(data.get("quantizer", "vector")),
        factor=int(data["factor"]),
        n_embed=int(data["n_embed"]),
        config=_parse_file(name, "config", files["config"]),
        checkpoint=_parse_file(name, "checkpoint", files["checkpoint"]),
    )


def read_registry(path: Path = REGISTRY_PATH) -> tuple[str, dict[str, ModelEntry]]:
    """Parse a registry JSON file; return (default model name, entries by name).

    Raises ModelError when the file is malformed.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"Cannot read the model registry {path}: {error}") from error

    try:
        entries = {name: _parse_entry(name, entry) for name, entry in data["models"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ModelError(f"The model registry {path} is malformed: {error!r}") from error
    default = data.get("default")
    if default not in entries:
        raise ModelError(f"The model registry {path} names an unknown default model {default!r}.")
    return default, entries


@lru_cache(maxsize=1)
def _builtin_registry() -> tuple[str, dict[str, ModelEntry]]:
    return read_registry(REGISTRY_PATH)


def default_model() -> str:
    """Return the name of the default VQGAN."""
    return _builtin_registry()[0]


def list_models() -> list[str]:
    """Return the names of all registered VQGANs, the default first."""
    default, entries = _builtin_registry()
    return [default, *sorted(name for name in entries if name != default)]


def is_registered(name: str) -> bool:
    """Return True if `name` is a registered VQGAN name."""
    return name in _builtin_registry()[1]


def get_model(name: str) -> ModelEntry:
    """Return the registry entry called `name`.

    Raises ModelError listing the valid names when there is none.
    """
    entries = _builtin_registry()[1]
    if name not in entries:
        raise ModelError(
            f"Unknown VQGAN model {name!r}. Known models: {', '.join(list_models())}. "
            "You can also give the path of a taming .ckpt file with its .yaml config beside it."
        )
    return entries[name]
