"""An option's default is written once (settings.OPTIONS): the ini key registered for it, the
value a default command line reads, and the Settings field a Settings made in code gets must
all be that one."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_refract import settings as S

FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(S.Settings) if f.default is not dataclasses.MISSING}


def test_every_mapped_option_names_a_settings_field():
    names = {f.name for f in dataclasses.fields(S.Settings)}
    assert set(S.OPTION_FIELDS) <= set(S.OPTION_DEFAULTS)
    assert set(S.OPTION_FIELDS.values()) <= names


@pytest.mark.parametrize("option,field", sorted(S.OPTION_FIELDS.items()))
def test_a_settings_field_default_is_its_options_default(option, field):
    if field in FIELD_DEFAULTS:
        assert FIELD_DEFAULTS[field] == S.option_default(option), f"Settings.{field} vs --refract-{option}"


def test_the_gate_defaults_to_the_verdict_everywhere():
    """The case that once disagreed: the flag said verdict, Settings said raw."""
    assert S.OPTION_DEFAULTS["gate"] == "verdict" == FIELD_DEFAULTS["gate_basis"]


def test_a_default_command_line_reads_the_table(pytester):
    config = pytester.parseconfig("--refract-model=m.gguf", "--refract-candidate=ctk=q8_0,ctv=q8_0",
                                  "-p", "no:cacheprovider")
    for name, _type, default, _help in S.OPTIONS:
        if default is not None and name != "candidate":
            assert config.getini("refract_" + name.replace("-", "_")) == default, name
    read = S.read_settings(config)
    for option, field in S.OPTION_FIELDS.items():
        assert getattr(read, field) == S.option_default(option), f"--refract-{option} read as {getattr(read, field)!r}"
        if field in FIELD_DEFAULTS:
            assert getattr(read, field) == FIELD_DEFAULTS[field], field
