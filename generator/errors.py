"""Exceptions raised while finding, downloading and loading models."""

from __future__ import annotations


class ModelError(RuntimeError):
    """A model could not be found, downloaded or loaded.

    The message is meant for people: it names the model or file, states what was
    wrong and what to do about it.
    """
