"""Build script: pyproject.toml holds the metadata; this file only adds the optional csrc/ native extension.

The extension (tnkernels._native) is optional by design:
  * TNK_NO_NATIVE=1 skips it entirely;
  * without torch importable at build time (isolated builds) it is skipped with a warning;
  * a failed compile prints a warning and the install continues (tnkernels then runs without the native backend).
Install with `pip install --no-build-isolation -e '.[test]'` in a venv that already has torch, so the extension is
built against that torch. TNK_NATIVE_MARCH selects the -march value (default "native": the extension is built on the
machine that runs it; set e.g. "x86-64-v3" or "" when building a wheel for other machines).
"""

from __future__ import annotations

import os
import platform
import sys
import warnings

from setuptools import setup


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _native_extension():
    """Return ([extension], cmdclass) for the csrc/ kernel, or ([], {}) when it is skipped."""
    if _truthy("TNK_NO_NATIVE"):
        print("tnkernels: TNK_NO_NATIVE=1, skipping the native extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # noqa: BLE001  (any failure to import torch means: build without the extension)
        warnings.warn(
            f"tnkernels: torch is not importable at build time ({exc}); skipping the native extension. "
            "Use `pip install --no-build-isolation` in a venv that has torch to build it.",
            stacklevel=1,
        )
        return [], {}

    march = os.environ.get("TNK_NATIVE_MARCH", "native").strip()
    # -ffp-contract=fast lets a*b+c become one FMA; -g0 drops debug info (halves compile time and .so size).
    cxx = ["-O3", "-g0", "-fopenmp", "-ffp-contract=fast"]
    if march and platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64"):
        cxx.append(f"-march={march}" if platform.machine().lower() in ("x86_64", "amd64") else f"-mcpu={march}")
    ext = CppExtension(
        name="tnkernels._native",
        sources=["csrc/module.cpp", "csrc/mpo_chain.cpp", "csrc/thin_gemm.cpp", "csrc/low_rank.cpp"],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """A compile failure warns instead of failing the install: the package works without the extension."""

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

        def build_extension(self, ext_) -> None:
            try:
                super().build_extension(ext_)
            except Exception as exc:  # noqa: BLE001
                self._warn(exc)

        @staticmethod
        def _warn(exc: BaseException) -> None:
            msg = (
                f"tnkernels: building the native extension failed ({exc}); continuing without it. "
                "backend='native' will be unavailable; set TNK_NO_NATIVE=1 to skip this build step."
            )
            warnings.warn(msg, stacklevel=1)
            print(msg, file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension}


_ext_modules, _cmdclass = _native_extension()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass)
