"""CLIP-guided VQGAN image generation.

Importing this package is cheap: the prompt grammar and the request record load
at once, and names that need torch load on first access, so a process that
only parses prompts and builds requests never imports torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from generator.prompts import Prompt, PromptError, check_prompt_length, parse_prompts
from generator.request import GenerationRequest, RequestError

__version__ = "0.1.0"

# Public name -> module that defines it, imported on first access.
_LAZY_NAMES = {
    "Progress": "generator.generate",
    "GenerationCancelled": "generator.generate",
    "generate": "generator.generate",
    "load_vqgan": "generator.models",
    "load_clip": "generator.models",
    "load_models": "generator.models",
    "Models": "generator.models",
    "ModelError": "generator.models",
    "resolve_device": "generator.models",
    "save_state": "generator.state",
    "load_state": "generator.state",
    "save_png": "generator.png",
    "read_png_metadata": "generator.png",
}

__all__ = [
    "GenerationCancelled",
    "GenerationRequest",
    "ModelError",
    "Models",
    "Progress",
    "Prompt",
    "PromptError",
    "RequestError",
    "__version__",
    "check_prompt_length",
    "generate",
    "load_clip",
    "load_models",
    "load_state",
    "load_vqgan",
    "parse_prompts",
    "read_png_metadata",
    "resolve_device",
    "save_png",
    "save_state",
]

if TYPE_CHECKING:
    from generator.generate import GenerationCancelled, Progress, generate
    from generator.models import (
        ModelError,
        Models,
        load_clip,
        load_models,
        load_vqgan,
        resolve_device,
    )
    from generator.png import read_png_metadata, save_png
    from generator.state import load_state, save_state


def __getattr__(name: str) -> Any:
    module_name = _LAZY_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module 'generator' has no attribute '{name}'")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """The package module, keeping ``generator.generate`` the function.

    Importing the submodule ``generator.generate`` makes Python set the package
    attribute ``generate`` to that module. The function is stored instead, so
    ``from generator import generate`` returns the function in any import
    order. ``from generator.generate import ...`` still reaches the module.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "generate" and isinstance(value, types.ModuleType):
            value = value.generate
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))
