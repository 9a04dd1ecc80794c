"""The package's folders are its layers, and imports go only downward (docs/design.md, "Layers
and the import rule"). Every import in every module is checked, those inside functions included;
imports under ``if TYPE_CHECKING:`` are type hints, not dependencies, and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_refract"

# Layer -> the layers it may import. "base" (errors, files, the run record, the version) is open to all.
ALLOWED = {
    "base": set(),
    "engines": {"base"},
    "scoring": {"base"},
    "inputs": {"engines", "base"},
    "reference": {"engines", "inputs", "base"},
    "axes": {"scoring", "inputs", "base"},
    "audit": {"engines", "reference", "inputs", "axes", "scoring", "base"},
    "report": {"axes", "scoring", "base"},
    "cli": {"report", "axes", "scoring", "base"},
    "top": {"top", "audit", "report", "cli", "engines", "reference", "inputs", "axes", "scoring", "base"},
}
BASE = {"pytest_refract", "pytest_refract.errors", "pytest_refract.files", "pytest_refract.record"}


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ALLOWED and parts[1] not in ("base", "top"):
        return parts[1]
    return "top"  # plugin, session, settings, hookspecs, fixtures, __main__


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), is_package, path


def _type_checking_lines(tree) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imported_modules(module: str, is_package: bool, path: Path):
    """Every pytest_refract module ``module`` imports, with its line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module.split(".") if is_package else module.split(".")[:-1]
    known = {name for name, _, _ in modules()}
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pytest_refract":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "pytest_refract":
                target = node.module
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full if full in known else target), node.lineno


def test_the_layer_table_knows_every_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(ALLOWED), f"a folder with no row in ALLOWED: {folders - set(ALLOWED)}"


@pytest.mark.parametrize("module,is_package,path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_only_go_downward(module, is_package, path):
    own = layer_of(module)
    bad = []
    for target, line in imported_modules(module, is_package, path):
        theirs = layer_of(target)
        if theirs != own and theirs not in ALLOWED[own]:
            bad.append(f"{path.name}:{line} imports {target} ({theirs}), which {own} may not import")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule can fail: an engine module importing the report layer is caught."""
    fake = tmp_path / "pytest_refract" / "engines"
    fake.mkdir(parents=True)
    (fake / "leak.py").write_text("def f():\n    from ..report import build\n")
    found = list(imported_modules("pytest_refract.engines.leak", False, fake / "leak.py"))
    assert found and layer_of(found[0][0]) == "report" and "report" not in ALLOWED["engines"]
