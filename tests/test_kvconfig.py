"""KV-cache configuration strings: parsing, labels, flash-attention sharing, model checks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_refract.errors import UsageProblem
from pytest_refract.engines.kvconfig import (
    CacheType,
    KVConfig,
    parse_kv_config,
    share_flash_attention,
    validate_for_model,
)

CACHE_TYPE_NAMES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "turbo4"]

configs = st.builds(
    KVConfig,
    ctk=st.sampled_from(CACHE_TYPE_NAMES),
    ctv=st.sampled_from(CACHE_TYPE_NAMES),
    fa=st.booleans(),
    nkvo=st.booleans(),
    swa_full=st.booleans(),
    fa_explicit=st.booleans(),
)


# --------------------------------------------------------------------------- parse / label


@given(configs)
def test_label_round_trips(config):
    parsed = parse_kv_config(config.label())
    assert parsed == config
    assert (parsed.ctk, parsed.ctv, parsed.fa, parsed.nkvo, parsed.swa_full) == (
        config.ctk, config.ctv, config.fa, config.nkvo, config.swa_full,
    )
    # fa appears in the label exactly when it is off (the default is never spelled out).
    assert parsed.fa_explicit == (not config.fa)


def test_label_is_canonical():
    assert KVConfig().label() == "ctk=f16,ctv=f16"
    assert KVConfig("q8_0", "q4_0", fa=False, nkvo=True, swa_full=True).label() == (
        "ctk=q8_0,ctv=q4_0,fa=off,nkvo=on,swa_full=on"
    )
    assert KVConfig("q8_0", "q4_0", fa_explicit=True).label() == "ctk=q8_0,ctv=q4_0"


def test_parse_defaults_and_normalisation():
    c = parse_kv_config("  CTK = Q8_0 , ctv=q4_0 ,")
    assert c == KVConfig(ctk="q8_0", ctv="q4_0", fa=True, nkvo=False, swa_full=False)
    assert c.fa_explicit is False
    assert c.short() == "q8_0-q4_0"
    assert c.quantized is True
    assert parse_kv_config("ctk=f16").ctv == "f16"
    assert parse_kv_config("ctk=f16,ctv=bf16").quantized is False


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cache-type-k=q8_0,cache-type-v=q4_0", KVConfig("q8_0", "q4_0")),
        ("cache_type_k=q8_0,type_v=q4_0", KVConfig("q8_0", "q4_0")),
        ("ctk=q8_0,flash-attn=off", KVConfig("q8_0", "f16", fa=False)),
        ("flash_attn=no", KVConfig(fa=False)),
        ("no-kv-offload=yes,swa-full=1", KVConfig(nkvo=True, swa_full=True)),
        ("no_kv_offload=true,swa_full=on", KVConfig(nkvo=True, swa_full=True)),
    ],
)
def test_aliases(text, expected):
    parsed = parse_kv_config(text)
    assert parsed == expected
    assert (parsed.fa, parsed.nkvo, parsed.swa_full) == (expected.fa, expected.nkvo, expected.swa_full)


def test_explicit_fa_is_remembered():
    assert parse_kv_config("ctk=q8_0,fa=on").fa_explicit is True
    assert parse_kv_config("flash-attn=off").fa_explicit is True
    assert parse_kv_config("ctk=q8_0").fa_explicit is False


@pytest.mark.parametrize("text", ["", "   ", None, ",", " , , "])
def test_empty_config_is_a_usage_problem(text):
    with pytest.raises(UsageProblem, match="empty KV config") as info:
        parse_kv_config(text)
    assert "ctk=q8_0" in str(info.value)  # shows an example


def test_missing_equals():
    with pytest.raises(UsageProblem) as info:
        parse_kv_config("ctk=q8_0,q4_0")
    msg = str(info.value)
    assert "'q4_0' is not key=value" in msg
    assert "ctk, ctv, fa, nkvo, swa_full" in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(UsageProblem) as info:
        parse_kv_config("ctk=q8_0,cvt=q4_0")
    msg = str(info.value)
    assert "unknown key 'cvt'" in msg
    for key in ("ctk", "ctv", "fa", "nkvo", "swa_full"):
        assert key in msg.split("keys:", 1)[1]


@pytest.mark.parametrize("text", ["ctk=q8_0,ctk=q4_0", "ctk=q8_0,cache-type-k=q4_0", "fa=on,flash_attn=on"])
def test_duplicate_key(text):
    with pytest.raises(UsageProblem, match="given twice"):
        parse_kv_config(text)


def test_bad_bool():
    with pytest.raises(UsageProblem) as info:
        parse_kv_config("ctk=q8_0,fa=maybe")
    msg = str(info.value)
    assert "fa='maybe'" in msg
    assert "must be on or off" in msg


def test_typo_in_bool_is_not_silently_accepted():
    with pytest.raises(UsageProblem, match="must be on or off"):
        parse_kv_config("ctv=q4_0,fa=of")


def test_empty_cache_type():
    with pytest.raises(UsageProblem, match="ctv needs a cache type"):
        parse_kv_config("ctk=q8_0,ctv=")


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(list("ctkvfa=,_- onfq8014nlswaurbe")), max_size=40),
))
def test_fuzz_parse_returns_config_or_usage_problem(text):
    try:
        result = parse_kv_config(text)
    except UsageProblem as exc:
        assert str(exc)
    else:
        assert isinstance(result, KVConfig)
        # Anything accepted has a label that parses back to the same config.
        assert parse_kv_config(result.label()) == result


# --------------------------------------------------------------------------- share_flash_attention


def test_share_flash_attention_inherits_from_candidate():
    ref = parse_kv_config("ctk=f16,ctv=f16")
    cand = parse_kv_config("ctk=q8_0,ctv=q8_0,fa=off")
    new_ref, new_cand = share_flash_attention(ref, cand)
    assert new_ref.fa is False
    assert new_cand.fa is False
    assert (new_ref.ctk, new_ref.ctv) == ("f16", "f16")


def test_share_flash_attention_inherits_from_reference():
    ref = parse_kv_config("ctk=f16,ctv=f16,fa=off")
    cand = parse_kv_config("ctk=q8_0,ctv=f16")
    new_ref, new_cand = share_flash_attention(ref, cand)
    assert (new_ref.fa, new_cand.fa) == (False, False)
    assert new_cand.ctk == "q8_0"


def test_share_flash_attention_neither_explicit_keeps_defaults():
    ref, cand = share_flash_attention(KVConfig(), KVConfig("q8_0", "q4_0"))
    assert (ref.fa, cand.fa) == (True, True)


def test_share_flash_attention_both_explicit_and_equal():
    ref, cand = share_flash_attention(parse_kv_config("fa=off"), parse_kv_config("ctk=q8_0,fa=off"))
    assert (ref.fa, cand.fa) == (False, False)


def test_share_flash_attention_conflict():
    with pytest.raises(UsageProblem) as info:
        share_flash_attention(parse_kv_config("fa=on"), parse_kv_config("ctk=q8_0,fa=off"))
    msg = str(info.value)
    assert "must share flash attention" in msg
    assert "reference has fa=on" in msg
    assert "candidate fa=off" in msg


# --------------------------------------------------------------------------- validate_for_model

TYPES = {
    "f32": CacheType("f32", 0, 1),
    "f16": CacheType("f16", 1, 1),
    "q4_0": CacheType("q4_0", 2, 32),
    "q8_0": CacheType("q8_0", 8, 32),
    "q4_k": CacheType("q4_k", 12, 256),
}


def test_validate_resolves_types():
    resolved = validate_for_model(KVConfig("q8_0", "q4_0"), TYPES, 64, 64, "candidate")
    assert resolved == (TYPES["q8_0"], TYPES["q4_0"])


def test_validate_unknown_type_lists_offered_types():
    with pytest.raises(UsageProblem) as info:
        validate_for_model(KVConfig("turbo4", "f16"), TYPES, 64, 64, "candidate")
    msg = str(info.value)
    assert msg.startswith("candidate ctk=turbo4")
    assert "no cache type 'turbo4'" in msg
    assert "it offers: f16, f32, q4_0, q4_k, q8_0" in msg


def test_block_size_is_left_to_llama_cpp_with_flash_attention():
    # llama.cpp checks (and forks pad heads, so a rule of ours could be wrong): no early refusal.
    assert validate_for_model(KVConfig("q4_k", "q4_k"), TYPES, 64, 64, "reference") == (TYPES["q4_k"], TYPES["q4_k"])


def test_block_size_of_k_is_checked_without_flash_attention():
    # With fa=off llama.cpp does not check K's block size and ggml would abort: refused here.
    with pytest.raises(UsageProblem) as info:
        validate_for_model(KVConfig("q4_k", "f16", fa=False), TYPES, 64, 64, "reference")
    msg = str(info.value)
    assert msg.startswith("reference ctk=q4_k")
    assert "block size 256" in msg
    assert "head dimension 64" in msg


def test_validate_block_size_ok_when_it_divides():
    assert validate_for_model(KVConfig("q4_k", "f16"), TYPES, 256, 256, "candidate")[0] is TYPES["q4_k"]


def test_validate_unknown_head_dim_skips_block_check():
    assert validate_for_model(KVConfig("q4_k", "q4_k"), TYPES, None, None, "candidate") == (
        TYPES["q4_k"], TYPES["q4_k"],
    )


def test_validate_quantized_v_needs_flash_attention():
    with pytest.raises(UsageProblem) as info:
        validate_for_model(KVConfig("f16", "q8_0", fa=False), TYPES, 64, 64, "candidate")
    msg = str(info.value)
    assert "candidate ctv=q8_0" in msg
    assert "needs flash attention" in msg


def test_validate_f16_v_without_flash_attention_is_ok():
    resolved = validate_for_model(KVConfig("q8_0", "f16", fa=False), TYPES, 64, 64, "candidate")
    assert resolved == (TYPES["q8_0"], TYPES["f16"])
