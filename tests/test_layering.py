"""The one-way dependencies docs/ARCHITECTURE.md promises, checked on the source.

Kernels know nothing of modules (ops never imports nn), the planner knows nothing of the layers, and distill/ uses
only the public tnkernels API (the package and its subpackages, never a module inside one, never ops). A new import
that breaks the order fails here with the file, the line and the rule.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The order of docs/ARCHITECTURE.md: each part of tnkernels may import the parts before it, never those after.
_ORDER = ["_int_pair", "decompose", "plan", "ops", "nn", "convert", "cli"]
_ALLOWED = {part: {*_ORDER[:i], "_version"} for i, part in enumerate(_ORDER)}
_ALLOWED["ops"].add("_native")  # the compiled extension is the kernels' own
_ALLOWED.update({"_version": set(), "_native": set(), "__main__": {"cli"}, "<package>": {*_ORDER, "_version"}})
# The documented exception: plan/backends.py asks ops/dispatch.py which backends exist, imported inside a function
# so that importing the planner never imports the kernels.
_EXCEPTIONS = {("tnkernels/plan/backends.py", "tnkernels.ops.dispatch")}
# What distill/ may import from tnkernels: the package and its public subpackages, as packages.
_DISTILL_MAY_IMPORT = {"tnkernels", "tnkernels.nn", "tnkernels.convert", "tnkernels.decompose", "tnkernels.plan"}
# Compiled modules (setup.py builds them; a clean checkout has no file for them until then).
_EXTENSIONS = {"tnkernels._native"}


def _imports(path: pathlib.Path, root: pathlib.Path = ROOT):
    """(line, absolute dotted name, at module level) of every tnkernels import in a file; `from a import b` yields
    `a.b` when b is a submodule of a, else `a`."""
    rel = path.relative_to(root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(rel.parent.parts)[: len(rel.parent.parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = root.joinpath(*base.split("."), alias.name)
                is_module = (
                    candidate.with_suffix(".py").exists() or candidate.is_dir() or f"{base}.{alias.name}" in _EXTENSIONS
                )
                yield node.lineno, f"{base}.{alias.name}" if is_module else base, id(node) in top_level


def _part(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def _package_files():
    return sorted((ROOT / "tnkernels").rglob("*.py"))


def test_every_part_of_the_package_is_in_the_table():
    parts = {_part(".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in _package_files()}
    parts = {"<package>" if p == "__init__" else p for p in parts}
    assert parts <= set(_ALLOWED), f"add {sorted(parts - set(_ALLOWED))} to _ALLOWED (and to docs/ARCHITECTURE.md)"


def _layer_violations(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    rel = path.relative_to(root)
    own = _part(".".join(rel.with_suffix("").parts))
    own = "<package>" if own == "__init__" else own
    bad = []
    for line, name, _ in _imports(path, root):
        if not name.startswith("tnkernels"):
            continue
        target = _part(name)
        if target == own or target in _ALLOWED[own] or (str(rel), name) in _EXCEPTIONS:
            continue
        bad.append(f"{rel}:{line} imports {name}: {own} may import only {sorted(_ALLOWED[own])}")
    return bad


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_tnkernels_imports_follow_the_layers(path):
    bad = _layer_violations(path)
    assert not bad, "\n".join(bad)


def test_the_exception_is_lazy():
    """plan/backends.py imports ops/dispatch.py inside a function only."""
    path = ROOT / "tnkernels/plan/backends.py"
    at_top = [line for line, name, top in _imports(path) if name.startswith("tnkernels.ops") and top]
    assert not at_top, f"tnkernels/plan/backends.py:{at_top} imports the kernels at module level"


@pytest.mark.parametrize("path", sorted((ROOT / "distill").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_distill_uses_only_the_public_api(path):
    rel = path.relative_to(ROOT)
    bad = [
        f"{rel}:{line} imports {name}; distill/ may import only {sorted(_DISTILL_MAY_IMPORT)} "
        "(export what it needs from the subpackage's __init__)"
        for line, name, _ in _imports(path)
        if name.startswith("tnkernels") and name not in _DISTILL_MAY_IMPORT
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The scan is not vacuous: an ops module that imports nn, absolutely or relatively, is caught."""
    bad = tmp_path / "tnkernels" / "ops" / "bad.py"
    bad.parent.mkdir(parents=True)
    (tmp_path / "tnkernels" / "nn").mkdir()
    (tmp_path / "tnkernels" / "nn" / "tucker_conv.py").write_text("")
    bad.write_text("from tnkernels.nn import MPOLinear\nfrom ..nn import tucker_conv\nfrom ..plan import cache\n")
    found = _layer_violations(bad, tmp_path)
    assert [v.split(" imports ")[1].split(":")[0] for v in found] == ["tnkernels.nn", "tnkernels.nn.tucker_conv"]
