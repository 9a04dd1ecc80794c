"""The one escaping function of the page.

Jinja's autoescape would escape with markupsafe, which writes ``'`` as ``&#39;`` and ``"`` as
``&#34;``. The renderer routes every ``{{ value }}`` through ``escape`` instead (the
environment's ``finalize``) so the page keeps the stdlib's ``&#x27;``/``&quot;`` it always
had: same bytes for the same report, and consumers that search the page for
``html.escape(text)`` keep finding it. Both escape the same five characters.
"""

from __future__ import annotations

import html
from typing import Any

from markupsafe import Markup


def escape(value: Any) -> Markup:
    """Escaped text of any value ("" for None); markup (``__html__``) passes unchanged."""
    if hasattr(value, "__html__"):
        return Markup(value.__html__())
    return Markup("" if value is None else html.escape(str(value), quote=True))
