"""Hooks other plugins (or a conftest.py) implement to extend pytest-refract."""

from __future__ import annotations

import pytest


@pytest.hookspec
def pytest_refract_axes(config):
    """Return axis objects (see pytest_refract.axes.base.Axis) to run beside the built-in four.

    Called once per process at configure time, before options are read, so the axes' names
    are valid in ``--refract-axes``. Every implementation's result is collected; return an
    empty list to add none."""


@pytest.hookspec
def pytest_refract_report(report, config):
    """Called with the final report dict (the JSON's content) once per session, on the
    controller, before the JSON and HTML files are written: upload it, post it to a pull
    request, or add entries under ``report["custom"]``. Return values are ignored."""
