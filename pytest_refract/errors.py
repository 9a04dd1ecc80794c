"""The two kinds of failure a user can meet, kept apart because pytest treats them apart.

A ``UsageProblem`` is something the user can fix on the command line or in a file before any
model runs; the plugin turns it into ``pytest.UsageError`` (exit 4, one line, no traceback).
A ``MeasurementError`` happens while llama.cpp runs; it fails the item with its message.
"""


class UsageProblem(Exception):
    """Bad flags, bad files, bad configs: one actionable line."""


class MeasurementError(Exception):
    """llama.cpp could not produce a number; never replaced by a default score."""
