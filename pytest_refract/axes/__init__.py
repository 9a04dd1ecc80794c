"""The audit's axes. Each module exposes:

- ``NAME``: the axis name used in test ids (``test_<NAME>[unit]``) and in the report;
- ``units(audit)``: the per-item units (ids and keywords), decided at collection time;
- ``measure(audit, unit)``: run llama.cpp for one unit, return a JSON-able result dict;
- ``aggregate(results)``: the axis section of the report, including ``score``.
"""

from . import kld, plad, rniah, trajectory

AXES = {m.NAME: m for m in (trajectory, kld, rniah, plad)}
ORDER = ("trajectory", "kld", "rniah", "plad")
