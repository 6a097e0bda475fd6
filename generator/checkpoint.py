"""Load model weights from files without running code from the file.

Taming's released checkpoints are PyTorch-Lightning ``.ckpt`` files. Beside the
``state_dict`` they pickle a ``ModelCheckpoint`` callback class (as a dict key)
and often OmegaConf containers holding the training hyperparameters. Loading
them with ``torch.load(weights_only=True)`` fails on those objects, and loading
with ``weights_only=False`` would run whatever the pickle names.

This module keeps ``weights_only=True`` and maps exactly those known names to
inert stand-in classes that only store their pickled state. Any other name is
rejected before unpickling starts. Safetensors files and plain state dicts load
as they are.
"""

from __future__ import annotations

import logging
import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

from generator.errors import ModelError

logger = logging.getLogger(__name__)

# Globals found beside the weights in taming and Lightning checkpoints. None of
# them is needed to read the weights, so each is replaced by a stand-in.
STAND_IN_GLOBALS = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
        "omegaconf.dictconfig.DictConfig",
        "omegaconf.listconfig.ListConfig",
        "omegaconf.nodes.AnyNode",
        "omegaconf.nodes.StringNode",
        "omegaconf.nodes.IntegerNode",
        "omegaconf.nodes.FloatNode",
        "omegaconf.nodes.BooleanNode",
        "omegaconf.base.Metadata",
        "omegaconf.base.ContainerMetadata",
        # OmegaConf records element and key types by referring to these.
        "typing.Any",
        "builtins.dict",
        "builtins.list",
        "builtins.tuple",
        "builtins.int",
        "builtins.float",
        "builtins.str",
        "builtins.bool",
        "builtins.object",
        "collections.defaultdict",
    }
)


class InertObject:
    """Stand-in for a pickled object that is not a weight: it stores its state and does nothing.

    Creating, calling or restoring it never runs code named by the checkpoint.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stand-in for {type(self).__module__}.{type(self).__qualname__}>"


def _stand_in(full_name: str) -> type[InertObject]:
    module, _, qualname = full_name.rpartition(".")
    return type(qualname, (InertObject,), {"__module__": module, "__qualname__": qualname})


_STAND_INS: dict[str, type[InertObject]] = {name: _stand_in(name) for name in STAND_IN_GLOBALS}


# Exceptions that torch.load (torch 2.x) raises for bytes that are not a checkpoint.
# Plain text makes the unpickler read an empty stack or memo (IndexError,
# KeyError). An HTML page hits an opcode that weights_only rejects
# (UnpicklingError). An empty or cut file ends early (EOFError), and a damaged
# zip fails in torch's zip reader (RuntimeError).
UNREADABLE_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    OverflowError,
    struct.error,
    zipfile.BadZipFile,
    OSError,
)

# Pattern of a global that weights_only rejects, in torch's text: "GLOBAL module.name".
_REJECTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _describe_content(path: Path) -> str:
    """Say what an unreadable file contains, judged from its first bytes."""
    try:
        with open(path, "rb") as file:
            head = file.read(512)
    except OSError:
        return "it cannot be opened"
    if not head:
        return "the file is empty"
    if head.lstrip()[:1] == b"<":
        return (
            "it contains an HTML or XML page (often an error page saved by a failed "
            "download), not model weights"
        )
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "it contains text, not model weights"
    return "it is corrupt, incomplete or another kind of file"


def _unreadable(path: Path, error: BaseException) -> ModelError:
    """Build the error for a file that is not a readable checkpoint; log torch's own text."""
    logger.debug("Reading %s failed", path, exc_info=error)
    size = path.stat().st_size if path.is_file() else 0
    return ModelError(
        f"{path} is not a valid model checkpoint ({size} bytes): {_describe_content(path)}. "
        "If it was downloaded, delete it and download it again; otherwise check the path."
    )


def find_unsafe_globals(path: Path) -> list[str]:
    """List the names pickled in a torch.save zip file that torch will not load by default."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except UNREADABLE_ERRORS as error:
        raise _unreadable(path, error) from error


def _reject_unknown(path: Path, names: Iterable[str]) -> None:
    unknown = sorted(set(names) - STAND_IN_GLOBALS)
    if unknown:
        raise ModelError(
            f"Refusing to load {path}: it contains Python objects other than weights "
            f"({', '.join(unknown)}), and loading them could run code. Use a checkpoint "
            "from a source you trust, or convert it to safetensors in an environment "
            "where you can inspect it."
        )


def load_torch_file(path: Path) -> Any:
    """Unpickle a torch.save file with weights_only=True and stand-ins for known extras.

    Raises ModelError when the file is missing, is not a readable checkpoint
    (text, an HTML page, a truncated or corrupt file), or names a Python global
    outside STAND_IN_GLOBALS. The message never contains torch's own advice;
    torch's text is logged at DEBUG.
    """
    if zipfile.is_zipfile(path):
        _reject_unknown(path, find_unsafe_globals(path))

    allowed = [(stand_in, name) for name, stand_in in _STAND_INS.items()]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_ERRORS as error:
        # Legacy (non-zip) files are only checked while unpickling. torch's text
        # suggests weights_only=False, which must never reach users, so only the
        # rejected name is kept.
        rejected = _REJECTED_GLOBAL.search(str(error))
        if isinstance(error, pickle.UnpicklingError) and rejected:
            logger.debug("Reading %s failed", path, exc_info=error)
            _reject_unknown(path, [rejected.group(1)])
        raise _unreadable(path, error) from error


def extract_state_dict(loaded: Any, path: Path) -> dict[str, Tensor]:
    """Return the tensors of a loaded checkpoint: its `state_dict` entry or the dict itself."""
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise ModelError(
            f"{path} contains no weights: expected a state_dict, or a dict with a "
            "'state_dict' entry, mapping parameter names to tensors."
        )

    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise ModelError(f"{path} contains no weights: its state_dict contains no tensors.")
    return tensors


def load_state_dict(path: Path) -> dict[str, Tensor]:
    """Read the weights of a checkpoint: safetensors, a plain state_dict or a Lightning .ckpt.

    Tensors are returned on the CPU. Raises ModelError for a missing, corrupt or
    unsafe file, with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"Model file not found: {path}")

    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise _unreadable(path, error) from error

    return extract_state_dict(load_torch_file(path), path)
