"""Inference engines behind one seam (see base.py for what an engine provides).

``llamacpp`` is the engine that ships; it is imported only when an audit runs, so a pytest
session without ``--refract-model`` never loads llama.cpp.
"""

from __future__ import annotations

import importlib

DEFAULT = "llamacpp"


def load(name: str = DEFAULT):
    """The engine module ``name`` (``pytest_refract.engines.<name>``)."""
    return importlib.import_module(f"{__name__}.{name}")
