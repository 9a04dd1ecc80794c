"""Reference packs: a run's f16 reference and its sensitivity control, saved as one portable,
self-contained folder, so that another build (a new llama.cpp release, a fork, a GPU) can be
measured against the same fixed truth instead of against its own f16.

A pack is a folder:

- ``manifest.json``: what the pack is for (``match``: the model's sha256, the reference and
  control configs, every setting that changes numerics, the inputs' digests and each axis's
  settings), the build that made it (``build``: library path and digest, llama-cpp-python's
  version, llama.cpp's system info), where it ran (``platform``), the namespace its entries
  are keyed in, every file with its size and sha256, and ``checksum``: the sha256 of all of
  that (canonical JSON), so one changed byte anywhere is found;
- ``entries/``: the reference's results (token ids, 16-bit log-prob rows stored sparse, exactly
  as the reference cache stores them) and the control's per-item results, one entry per item,
  in the reference cache's entry format (each entry checksummed on its own as well).

Nothing from a pack is used before the whole pack has been verified (every file's size and
sha256, the manifest's checksum, no file missing or extra) and its ``match`` equals the run's.
Every entry is hashed again when it is read, against the manifest. A defect is a one-line
usage error before any item runs, or an item failure when an entry changed during the run;
a pack is never repaired, cleared or written to by a run that reads it.

Writing: a run saving a pack writes its entries into a staging folder beside the target and,
once the run is complete, writes the manifest and swaps the folder in. A non-empty folder that
is not a pack is never written to; an existing pack is replaced only while no running session
reads it (readers hold a shared lock on its manifest for the whole session)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zlib
from pathlib import Path
from types import ModuleType
from typing import IO, Dict, List, Optional, Tuple

import numpy as np

from ..errors import MeasurementError, UsageProblem
from ..files import special_file_kind, write_atomic
from .codec import decode_payload
from .entries import ReferenceCache, _unpack_arrays, _verified_parts, check_entry

fcntl: Optional[ModuleType]
try:  # POSIX; elsewhere a pack is read and replaced without the lock
    import fcntl as _fcntl_module

    fcntl = _fcntl_module
except ImportError:  # pragma: no cover
    fcntl = None

PACK_FORMAT = "pytest-refract-reference-pack"
# The layout and manifest this code writes and reads; a pack of a higher schema is refused
# (its meaning may differ), never read by guesswork.
PACK_SCHEMA = 1
MANIFEST = "manifest.json"
ENTRIES = "entries"
# Bounds on what is read: the manifest whole, each entry whole (a KLD entry of a 262k
# vocabulary is tens of MB), and how many files a pack may list.
MAX_MANIFEST_BYTES = 32 << 20
MAX_ENTRY_BYTES = 1 << 30
MAX_FILES = 200_000
_REL_RE = re.compile(r"entries/[0-9a-f]{20}/(trajectory|kld|greedy|control-[a-z][a-z0-9_]{0,31})/[0-9a-f]{40}\.rfc")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical(obj) -> bytes:
    """The bytes a manifest's checksum covers: sorted keys, no whitespace, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def manifest_checksum(manifest: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in manifest.items() if k != "checksum"})).hexdigest()


def entry_identity(match: dict) -> dict:
    """What the pack's entries are keyed by besides each item's own inputs: the model, the
    reference config and the numerics. The build is left out on purpose: a pack is read by
    other builds, and the same item must find the same entry."""
    return {"pack_schema": PACK_SCHEMA, "model": match["model"], "reference": match["reference"],
            "numerics": match["numerics"]}


def describe_mismatch(pack: dict, run: dict) -> Optional[str]:
    """The first way a pack's ``match`` differs from the run's, in words, or None.

    The inputs and axes the run uses must be in the pack with the same digests and settings;
    inputs or axes the pack has beyond the run's are fine (a pack of every axis serves a run
    of one)."""
    def short(v) -> str:
        text = json.dumps(v, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    if pack.get("model", {}).get("sha256") != run["model"]["sha256"]:
        return (f"it was made for another model (sha256 {str(pack.get('model', {}).get('sha256'))[:12]}..., this run's "
                f"is {run['model']['sha256'][:12]}...)")
    for key, what in (("reference", "reference config"), ("control", "sensitivity control")):
        if pack.get(key) != run[key]:
            return f"its {what} is {short(pack.get(key))}, this run's is {short(run[key])}"
    for name, value in run["numerics"].items():
        theirs = (pack.get("numerics") or {}).get(name, "(absent)")
        if theirs != value:
            return f"it was made with {name}={short(theirs)}, this run uses {short(value)} (a setting that changes numerics)"
    for name, digest in run["inputs"].items():
        if digest is None:
            continue
        theirs = (pack.get("inputs") or {}).get(name)
        if theirs != digest:
            return (f"its {name} differ from this run's (sha256 {str(theirs)[:12]}... vs {digest[:12]}...): "
                    f"it was made with other {name}")
    for axis, reads in run["axes"].items():
        theirs = (pack.get("axes") or {}).get(axis)
        if theirs is None:
            return f"it holds no {axis} axis (it has {', '.join(sorted(pack.get('axes') or {})) or 'none'})"
        if theirs != reads:
            return f"its {axis} axis was measured with {short(theirs)}, this run asks for {short(reads)}"
    return None


def _problem(path: Path, why: str, hint: str = "save it again with --refract-save-reference") -> UsageProblem:
    return UsageProblem(f"reference pack {path} cannot be used: {why}; {hint}")


def _read_manifest(path: Path) -> dict:
    """The manifest, checked for format, schema and its own checksum (nothing else read yet)."""
    kind = special_file_kind(path)
    if kind:
        raise _problem(path, f"it is {kind}, not a folder", "give the folder --refract-save-reference wrote")
    if not path.exists():
        raise _problem(path, "no such folder", "give the folder --refract-save-reference wrote")
    if not path.is_dir():
        raise _problem(path, "it is a file, not a folder", "give the folder --refract-save-reference wrote")
    mpath = path / MANIFEST
    if not mpath.is_file() or mpath.is_symlink():
        raise _problem(path, f"it has no {MANIFEST} (not a pack, or a truncated one)")
    try:
        with open(mpath, "rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise _problem(path, f"{MANIFEST} cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _problem(path, f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _problem(path, f"{MANIFEST} is not valid JSON (damaged or truncated)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise _problem(path, f"{MANIFEST} is not a pytest-refract reference pack's")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise _problem(path, "its schema is missing")
    if schema > PACK_SCHEMA:
        raise _problem(path, f"it was written with pack schema {schema}, newer than this pytest-refract reads "
                             f"({PACK_SCHEMA})", "upgrade pytest-refract, or save the pack again with this version")
    if schema < PACK_SCHEMA:
        raise _problem(path, f"it was written with pack schema {schema}, older than this pytest-refract reads ({PACK_SCHEMA})")
    for key, expected_type in (("match", dict), ("files", dict), ("build", dict), ("entry_identity", dict), ("checksum", str)):
        if not isinstance(manifest.get(key), expected_type):
            raise _problem(path, f"{MANIFEST} has no {key}")
    try:
        checksum = manifest_checksum(manifest)
    except (TypeError, ValueError):
        raise _problem(path, f"{MANIFEST} holds values no pack writes") from None
    if checksum != manifest["checksum"]:
        raise _problem(path, f"the checksum of {MANIFEST} does not match its contents (it was changed or damaged)")
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    """Every listed file exists with its size and sha256; no other file is there."""
    files = manifest["files"]
    if len(files) > MAX_FILES:
        raise _problem(path, f"it lists {len(files)} files, more than {MAX_FILES}")
    for rel, facts in files.items():
        if (not isinstance(rel, str) or not _REL_RE.fullmatch(rel) or not isinstance(facts, dict)
                or not isinstance(facts.get("bytes"), int) or not _HEX64.fullmatch(str(facts.get("sha256")))):
            raise _problem(path, f"{MANIFEST} lists a file no pack writes ({str(rel)[:60]})")
        if facts["bytes"] > MAX_ENTRY_BYTES:
            raise _problem(path, f"{rel} is larger than {MAX_ENTRY_BYTES >> 30} GiB")
    present = set()
    for root, dirs, names in os.walk(path):
        for name in names:
            present.add(Path(root, name).relative_to(path).as_posix())
        for d in dirs:
            if Path(root, d).is_symlink():
                raise _problem(path, f"it holds a link ({Path(root, d).relative_to(path)})")
    present.discard(MANIFEST)
    extra = sorted(present - set(files))
    if extra:
        raise _problem(path, f"it holds files its manifest does not list ({', '.join(extra[:2])})")
    for rel, facts in files.items():
        f = path / rel
        if not f.is_file() or f.is_symlink():
            raise _problem(path, f"{rel} is missing (a truncated pack)")
        size = f.stat().st_size
        if size != facts["bytes"]:
            raise _problem(path, f"{rel} is {size} bytes, its manifest says {facts['bytes']} (truncated or changed)")
        if _file_digest(f) != facts["sha256"]:
            raise _problem(path, f"{rel} does not match its checksum (it was changed or damaged)")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PackReader:
    """A verified pack, read lazily: ``cache`` (a PackCache) serves the reference store.

    The manifest stays open with a shared lock for as long as the reader lives, so a session
    saving a pack to the same folder cannot replace it under this one."""

    def __init__(self, path, run_match: Optional[dict], n_vocab: Optional[int] = None):
        self.path = Path(path).expanduser()
        self._lock_fh: Optional[IO[bytes]] = None
        manifest = self._locked_manifest()
        try:
            _verify_files(self.path, manifest)
            if run_match is not None:
                problem = describe_mismatch(manifest["match"], run_match)
                if problem:
                    raise _problem(self.path, problem, "use a pack saved with this run's model, inputs and settings")
                if entry_identity(manifest["match"]) != manifest["entry_identity"]:
                    raise _problem(self.path, "its entry namespace does not follow from its match")
        except BaseException:
            self.close()
            raise
        self.manifest = manifest
        self.cache = PackCache(self, n_vocab)

    def _locked_manifest(self) -> dict:
        """Read and check the manifest under a shared lock, retrying when the folder was
        swapped between opening the file and locking it (a writer replaced the pack)."""
        for _ in range(5):
            manifest = _read_manifest(self.path)
            if fcntl is None:
                return manifest
            try:
                fh = open(self.path / MANIFEST, "rb")
            except OSError as exc:
                raise _problem(self.path, f"{MANIFEST} cannot be opened ({exc.strerror or exc})") from None
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path / MANIFEST).st_ino
            except OSError:
                same = False
            if same:
                again = _read_manifest(self.path)
                if again == manifest:
                    self._lock_fh = fh
                    return manifest
            fh.close()
        raise _problem(self.path, "it kept changing while being opened (another session is writing it)",
                       "try again once that session has finished")

    @property
    def match(self) -> dict:
        return self.manifest["match"]

    def summary(self) -> dict:
        """What the report says of the pack: where, which build made it, how big."""
        files = self.manifest["files"]
        home = os.path.expanduser("~")
        shown = str(self.path)
        if home not in ("", "/") and shown.startswith(home + os.sep):
            shown = "~" + shown[len(home):]  # no home directory in a report that may be shared
        return {"path": shown, "checksum": self.manifest["checksum"], "schema": self.manifest["schema"],
                "written_by": self.manifest.get("written_by"), "build": self.manifest["build"],
                "platform": self.manifest.get("platform"), "files": len(files),
                "bytes": sum(f["bytes"] for f in files.values()) + _size(self.path / MANIFEST)}

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class PackCache:
    """The reference cache's interface over a verified pack, for the reference store: the
    same keys (in the pack's namespace), loads that re-hash every entry against the manifest
    and fail the item on any defect (never recompute, never delete), and no writes."""

    def __init__(self, reader: PackReader, n_vocab: Optional[int]):
        self.reader = reader
        self._keys = ReferenceCache(reader.path / ENTRIES, reader.manifest["entry_identity"], n_vocab)
        # ReferenceCache adds its own format to the namespace; the pack's entries are in it.
        self.identity = dict(reader.manifest["entry_identity"])
        self.namespace = self._keys.namespace
        self.n_vocab = n_vocab
        self.directory = None  # not a cache folder: nothing is cleared or sized as one
        self.hits = 0
        self.misses = 0
        self.bytes_written = 0
        self.bytes_read = 0

    enabled = True

    def key(self, kind: str, *parts) -> str:
        return self._keys.key(kind, *parts)

    def _rel(self, kind: str, key: str) -> str:
        return f"{ENTRIES}/{self.namespace}/{kind}/{key[:40]}.rfc"

    def has(self, kind: str, key: str) -> bool:
        return self._rel(kind, key) in self.reader.manifest["files"]

    def load(self, kind: str, key: str) -> dict:
        rel = self._rel(kind, key)
        facts = self.reader.manifest["files"].get(rel)
        where = self.reader.path
        if facts is None:
            self.misses += 1
            raise MeasurementError(
                f"reference pack {where} holds no {kind} entry for this item: it was saved from a run with other "
                "items (--refract-max-items, -k, the decode batch) or other inputs; save it from a run that measures "
                "every item this one does")
        try:
            with open(where / rel, "rb") as fh:
                raw = fh.read(facts["bytes"] + 1)
        except OSError as exc:
            raise MeasurementError(f"reference pack {where}: {rel} cannot be read ({exc.strerror or exc})") from None
        if len(raw) != facts["bytes"] or hashlib.sha256(raw).hexdigest() != facts["sha256"]:
            raise MeasurementError(f"reference pack {where}: {rel} changed since the pack was verified; "
                                   "no result is read from it")
        try:
            header, payload = _verified_parts(raw)
            if header.get("key") != key or len(payload) != header.get("size"):
                raise ValueError("entry belongs to another key")
            arrays = decode_payload(_unpack_arrays(zlib.decompress(payload), header["arrays"]))
            meta = json.loads(header.get("meta") or "{}")
            check_entry(kind, arrays, meta, self.n_vocab)
        except Exception as exc:  # verified bytes, yet not an entry this code can use
            raise MeasurementError(f"reference pack {where}: {rel} is not a usable {kind} entry ({exc})") from None
        self.hits += 1
        self.bytes_read += len(raw)
        return {"meta": meta, "arrays": arrays}

    def store(self, kind: str, key: str, arrays, meta=None) -> None:
        """A pack is never written by a run that reads it."""


# -- writing ------------------------------------------------------------------------------------


def check_save_target(path) -> Path:
    """The folder --refract-save-reference may write, checked before anything runs: new, empty,
    or a pack (which is replaced at the end). UsageProblem otherwise."""
    target = Path(path).expanduser()
    kind = special_file_kind(target)
    if kind:
        raise UsageProblem(f"--refract-save-reference={target} is {kind}; give a new or empty folder, or a pack")
    if target.exists() and not target.is_dir():
        raise UsageProblem(f"--refract-save-reference={target} is a file; give a new or empty folder, or a pack")
    if target.is_symlink():
        raise UsageProblem(f"--refract-save-reference={target} is a link; give the folder itself")
    if target.is_dir() and any(target.iterdir()) and not is_pack(target):
        raise UsageProblem(f"--refract-save-reference={target} is a folder that holds files and is not a reference "
                           "pack; refusing to write into it: give a new or empty folder")
    if not target.parent.is_dir():
        raise UsageProblem(f"--refract-save-reference={target}: the folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise UsageProblem(f"--refract-save-reference={target}: the folder {target.parent} is not writable")
    return target


def is_pack(path: Path) -> bool:
    """Whether ``path`` holds a pack's manifest (of any schema; its files are not checked)."""
    try:
        mpath = Path(path) / MANIFEST
        if not mpath.is_file() or mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        return json.loads(mpath.read_text(encoding="utf-8")).get("format") == PACK_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


class PackWriter:
    """Entries go to a staging folder beside the target as the run produces them; ``finish``
    writes the manifest and swaps the staging folder in, ``discard`` removes it."""

    def __init__(self, target, match: dict, n_vocab: Optional[int] = None):
        self.target = check_save_target(target)
        self.match = match
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        self.cache = ReferenceCache(self.staging / ENTRIES, entry_identity(match), n_vocab)

    def finish(self, build: dict, platform: dict, written_by: str) -> Path:
        """Write the manifest over every staged file, then put the pack in place. UsageProblem
        (nothing replaced) when an existing pack at the target is being read by a session."""
        if self.cache.directory is None:  # an entry could not be written (a full disk): the pack would lack it
            self.discard()
            raise UsageProblem(f"--refract-save-reference={self.target}: the pack's entries could not all be written "
                               "(see the warning above); no pack was saved")
        files: Dict[str, dict] = {}
        root = self.staging
        for dirpath, _dirs, names in os.walk(root):
            for name in sorted(names):
                f = Path(dirpath, name)
                files[f.relative_to(root).as_posix()] = {"bytes": f.stat().st_size, "sha256": _file_digest(f)}
        counts: Dict[str, int] = {}
        for rel in files:
            kind = rel.split("/")[2]
            counts[kind] = counts.get(kind, 0) + 1
        manifest = {"format": PACK_FORMAT, "schema": PACK_SCHEMA, "written_by": written_by, "match": self.match,
                    "entry_identity": entry_identity(self.match), "build": build, "platform": platform,
                    "counts": dict(sorted(counts.items())), "files": dict(sorted(files.items()))}
        manifest["checksum"] = manifest_checksum(manifest)
        write_atomic(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n")
        try:
            swap_in(root, self.target)
        except UsageProblem:
            self.kept = True  # a whole pack the user can move into place once the reader is done
            raise
        return self.target

    kept = False

    def discard(self) -> None:
        """Remove the staging folder, unless it was left as the finished pack (see finish)."""
        if not self.kept:
            shutil.rmtree(self.staging, ignore_errors=True)


def swap_in(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``. An existing pack there is moved aside and deleted only
    under an exclusive lock on its manifest, which a reading session's shared lock denies; a
    target that is an empty folder is replaced; anything else is refused."""
    if not target.exists():
        os.rename(staging, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        os.rename(staging, target)
        return
    if not is_pack(target):
        raise UsageProblem(f"--refract-save-reference={target} now holds files that are not a pack; the pack is "
                           f"left at {staging}")
    lock = open(target / MANIFEST, "rb")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UsageProblem(f"--refract-save-reference={target}: a running session reads that pack; it was not "
                                   f"replaced, the new pack is at {staging}") from None
        aside = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, aside)
        os.rename(staging, target)
    finally:
        lock.close()
    shutil.rmtree(aside, ignore_errors=True)


class RecordingCache:
    """The run's own reference cache, with every entry it stores or reads also written to a
    pack (under the pack's key for the same item). Everything else is the local cache's."""

    def __init__(self, local: ReferenceCache, pack: ReferenceCache):
        self.local = local
        self.pack = pack
        self._pack_key: Dict[str, str] = {}

    enabled = True  # the pack is written whether or not a local cache is

    def __getattr__(self, name):  # hits, misses, bytes, directory, identity, namespace, n_vocab
        return getattr(self.local, name)

    def key(self, kind: str, *parts) -> str:
        key = self.local.key(kind, *parts)
        self._pack_key[key] = self.pack.key(kind, *parts)
        return key

    def has(self, kind: str, key: str) -> bool:
        return self.local.has(kind, key)

    def load(self, kind: str, key: str) -> Optional[dict]:
        entry = self.local.load(kind, key)
        if entry is not None:
            self.pack.store(kind, self._pack_key[key], dict(entry["arrays"]), entry["meta"])
        return entry

    def store(self, kind: str, key: str, arrays, meta=None) -> None:
        self.local.store(kind, key, arrays, meta)
        self.pack.store(kind, self._pack_key[key], arrays, meta)


def run_match(*, model_sha256: str, model_size: int, reference: str, control: Optional[str], numerics: dict,
              inputs: Dict[str, Optional[str]], axes: Dict[str, dict]) -> dict:
    """What a pack must agree with for a run to use it (see describe_mismatch)."""
    return {"model": {"sha256": model_sha256, "size": model_size}, "reference": reference, "control": control,
            "numerics": dict(numerics), "inputs": dict(inputs), "axes": json.loads(json.dumps(axes, sort_keys=True,
                                                                                          default=str))}


def prompts_digest(prompts: List[Tuple[str, str, str]]) -> str:
    """The sha256 of a prompt set as the run uses it: (id, category, text) per prompt, in order."""
    return hashlib.sha256(canonical([list(p) for p in prompts])).hexdigest()


def dense_equal(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> bool:
    """Whether two stored entries' arrays are the same bits (for tests and checks)."""
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
