"""Settings made in code (tests, other plugins) behave as a default command line does."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_refract.settings import OPTION_DEFAULTS, Settings

DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings) if f.default is not dataclasses.MISSING}
# Fields whose option default is text the command line parses: how to parse it here.
PARSE = {"rniah_positions": lambda text: tuple(float(x) for x in text.split(","))}


@pytest.mark.parametrize("option", sorted(o for o in OPTION_DEFAULTS if o.replace("-", "_") in DEFAULTS))
def test_dataclass_default_is_the_option_default(option):
    name = option.replace("-", "_")
    text = OPTION_DEFAULTS[option]
    expected = None if text is None else PARSE.get(name, type(DEFAULTS[name]))(text)
    assert DEFAULTS[name] == expected


def test_decode_batch_default_is_the_cli_default():
    assert DEFAULTS["decode_batch"] == 16 == int(OPTION_DEFAULTS["decode-batch"])
