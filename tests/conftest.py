"""Fixtures shared by the test modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from generator.testing import TinyModels


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """Tiny random-weight VQGAN and CLIP files in the real formats, built once per session.

    The result contains spec strings (``vqgan``: a checkpoint path, ``clip``: a
    ``MODEL/PRETRAINED`` spec) for ``load_models`` and the command line.
    """
    from generator.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))
