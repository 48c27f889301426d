"""What a non-editable install gets: the sdist's and the wheel's file lists, and the wheel's metadata.

CI installs the repo in editable mode, where every file of the clone is on disk, so a file missing from (or wrongly
shipped in) the distributions would go unnoticed there. These tests build the sdist and a pure-Python wheel
(TNK_NO_NATIVE=1: no compile) from a copy of the tracked files, offline, with the setuptools of the running venv.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import tnkernels

ROOT = Path(__file__).resolve().parents[1]


def _source_files() -> list[str]:
    """The files a fresh clone would hold, plus new files not yet committed (git's view, ignored files left out)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are source files")
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory) -> tuple[Path, list[str]]:
    """A copy of the source files: building in the working tree would write egg-info and build/ into it."""
    dst = tmp_path_factory.mktemp("src")
    files = _source_files()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    return dst, files


def _setup_py(tree: Path, *args: str, no_native: bool) -> None:
    env = dict(os.environ)
    if no_native:
        env["TNK_NO_NATIVE"] = "1"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", *args], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def sdist_names(clean_tree, tmp_path_factory) -> set[str]:
    tree, _ = clean_tree
    dist = tmp_path_factory.mktemp("sdist")
    # no_native=False: the sdist must carry csrc/ however it is built, so build it the default way.
    _setup_py(tree, "sdist", "--dist-dir", str(dist), no_native=False)
    (archive,) = dist.glob("tnkernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        prefix = f"tnkernels-{tnkernels.__version__}/"
        names = {m.name.removeprefix(prefix) for m in tar.getmembers() if m.isfile()}
    return names


@pytest.fixture(scope="module")
def wheel(clean_tree, tmp_path_factory) -> zipfile.ZipFile:
    tree, _ = clean_tree
    dist = tmp_path_factory.mktemp("wheel")
    _setup_py(tree, "bdist_wheel", "--dist-dir", str(dist), no_native=True)
    (path,) = dist.glob("tnkernels-*.whl")
    return zipfile.ZipFile(path)


def _package_files(files: list[str]) -> list[str]:
    return [f for f in files if f.startswith(("tnkernels/", "distill/")) and f.endswith((".py", ".txt"))]


def test_sdist_builds_the_native_extension_and_ships_the_package(sdist_names, clean_tree):
    _, files = clean_tree
    # every source the extension compiles (setup.py's list) and the header they include
    for f in ("csrc/module.cpp", "csrc/mpo_chain.cpp", "csrc/thin_gemm.cpp", "csrc/low_rank.cpp", "csrc/kernels.h"):
        assert f in sdist_names, f
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"} <= sdist_names
    missing = [f for f in _package_files(files) if f not in sdist_names]
    assert not missing, f"package files left out of the sdist: {missing}"
    assert "distill/hf/data/corpus.txt" in sdist_names  # read at run time through Path(__file__)


def test_sdist_ships_no_partial_test_suite(sdist_names):
    # setuptools adds tests/test*.py by default, but not conftest.py, helpers.py, __init__.py or the sub-folders,
    # and the suite imports bench/ (not shipped): that copy could not run. The tests run from a clone.
    tests = sorted(n for n in sdist_names if n.startswith("tests/"))
    assert not tests, f"the sdist ships a partial test suite: {tests[:5]}..."


def test_sdist_ships_no_build_outputs_or_caches(sdist_names):
    bad = [n for n in sdist_names if n.endswith((".so", ".pyd", ".pyc", ".o")) or "__pycache__" in n]
    bad += [n for n in sdist_names if n.split("/")[0] in ("bench", "docs", "build", "dist", ".venv", ".ci")]
    assert not bad, bad


def test_wheel_holds_the_packages_their_data_and_the_commands(wheel, clean_tree):
    _, files = clean_tree
    names = set(wheel.namelist())
    missing = [f for f in _package_files(files) if f not in names]
    assert not missing, f"package files left out of the wheel: {missing}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"tnkernels", "distill"}, tops  # no tests/, bench/ or csrc/ installed into site-packages
    info = f"tnkernels-{tnkernels.__version__}.dist-info"
    meta = wheel.read(f"{info}/METADATA").decode()
    assert f"\nVersion: {tnkernels.__version__}\n" in meta
    eps = wheel.read(f"{info}/entry_points.txt").decode()
    assert "tnk = tnkernels.cli:main" in eps
    assert "distill = distill.cli:register" in eps  # `tnk compress` comes from this plug-in entry


def test_isolated_builds_do_not_fetch_torch():
    """An isolated build (`pip install .` without --no-build-isolation) must not pull torch into its build env: it
    would compile the extension against whichever torch pip picks there (with its CUDA libraries, ~5 GB), not the
    venv's, and an extension built against another torch release fails to import (undefined symbols)."""
    tomllib = pytest.importorskip("tomllib")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    names = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requires]
    assert "torch" not in names, requires


def test_build_without_torch_installs_without_the_extension(clean_tree, tmp_path):
    """What an isolated build does now: torch is not importable, so setup.py warns (naming the flag that builds the
    extension) and the wheel holds the pure-Python package."""
    tree, _ = clean_tree
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch in this build env')\n")
    env = {k: v for k, v in os.environ.items() if k != "TNK_NO_NATIVE"}
    env["PYTHONPATH"] = str(fake)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "bdist_wheel", "--dist-dir", str(dist)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipping the native extension" in proc.stderr and "--no-build-isolation" in proc.stderr, proc.stderr
    (whl,) = dist.glob("tnkernels-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "tnkernels/__init__.py" in names
    assert not [n for n in names if n.startswith("tnkernels/_native")], names


def test_installed_version_matches_the_package():
    """The metadata pip reads (from the install, editable or not) agrees with tnkernels.__version__."""
    from importlib.metadata import version

    assert version("tnkernels") == tnkernels.__version__


@pytest.mark.parametrize("module", ["tnkernels", "tnkernels.cli"])
def test_python_dash_m_runs_the_tnk_command(module, tmp_path):
    # from an unrelated folder, so that the repo root on sys.path cannot be what makes it work
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tnkernels {tnkernels.__version__}"


def test_missing_extension_is_reported_as_missing(tmp_path):
    """An install without the extension (isolated build, failed compile, TNK_NO_NATIVE=1) explains itself: the
    reason names the missing module instead of Python's misleading "partially initialized module ... circular
    import" that `from tnkernels import _native` gives while tnkernels is still importing."""
    pkg = tmp_path / "site"
    shutil.copytree(ROOT / "tnkernels", pkg / "tnkernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        # an editable install's finder would resolve tnkernels._native to the checkout's build: drop it
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import tnkernels\n"
        "from tnkernels.ops.mpo import native_impl\n"
        "print(tnkernels.__file__)\n"
        "print(native_impl.native_available(), native_impl.is_available()[1])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(pkg))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    where, why = proc.stdout.splitlines()[:2]
    assert where.startswith(str(pkg)), where  # the copy without the extension was imported, not the checkout
    assert why.startswith("False ") and "No module named 'tnkernels._native'" in why, why
    assert "circular import" not in why, why
