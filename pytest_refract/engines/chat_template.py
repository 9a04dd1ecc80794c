"""A model's chat template is the file's own code: rendering it is bounded in loop items, time
and output size, so that no template can hang or flood a run."""

from __future__ import annotations

import threading

from .base import TemplateProblem

# Bounds on rendering a chat template (a file's own code): items its range() loops may produce
# per render, seconds per render, characters of the rendered turn. A real template renders a
# user turn in milliseconds, to a few hundred characters plus the content.
TEMPLATE_MAX_LOOP_ITEMS = 100_000
TEMPLATE_SECONDS = 10.0
TEMPLATE_MAX_CHARS = 1 << 20


class _TemplateBudget(Exception):
    pass


def _bound_template_loops(formatter) -> list:
    """Give the template a range() that counts what all its loops draw from it in one render
    (Jinja2's sandbox only caps each range at 100k items: nested, 100k x 100k never ends).
    Returns the budget cell render() resets."""
    budget = [TEMPLATE_MAX_LOOP_ITEMS]
    env = getattr(getattr(formatter, "_environment", None), "environment", None)
    if env is None:
        return budget  # another llama-cpp-python layout: the time bound still holds
    inner = env.globals.get("range", range)

    def counted(*args):
        items = inner(*args)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise _TemplateBudget(f"its loops draw more than {TEMPLATE_MAX_LOOP_ITEMS} range() items for one turn")
        return items

    env.globals["range"] = counted
    return budget


def _bounded_render(call):
    """``call()`` in a daemon thread, waited for TEMPLATE_SECONDS: a template that does not
    finish is a TemplateProblem (its thread is abandoned; the run then stops at configure)."""
    out: dict = {}

    def work():
        try:
            out["text"] = call()
        except BaseException as exc:  # reported below, in the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=work, name="refract-template", daemon=True)
    worker.start()
    worker.join(TEMPLATE_SECONDS)
    if worker.is_alive():
        raise TemplateProblem(TimeoutError(f"rendering one user turn took over {TEMPLATE_SECONDS:g} s"))
    if "error" in out:
        raise TemplateProblem(out["error"]) from None
    return out["text"]
