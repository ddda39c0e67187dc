"""Builds Conveyor's native CPU kernels at install (everything else is in pyproject.toml).

Every C file in engine/platform/kernels/ is compiled once per CPU variant of
engine/platform/kernel_variants.py (AVX-512 VNNI, AVX2, baseline on x86-64;
the baseline elsewhere) and linked into one plain shared library per variant,
engine/platform/_kernels_<variant>.so, which engine/platform/native.py picks
from at run time and loads with ctypes. They are not Python modules: each
source keeps its own flags, and the file name carries no Python ABI tag. A
compiler error fails the install with the compiler's message.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
PACKAGE = "engine.platform"


def _variants_module():
    """engine/platform/kernel_variants.py, loaded by path: the package itself
    can't be imported before its dependencies are installed."""
    path = ROOT / "engine" / "platform" / "kernel_variants.py"
    spec = importlib.util.spec_from_file_location("_conveyor_kernel_variants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kv = _variants_module()


class KernelLibrary(Extension):
    """One variant's shared library, built by BuildKernels."""

    def __init__(self, variant):
        folder = kv.KERNELS_DIR
        super().__init__(f"{PACKAGE}.{kv.library_name(variant.name)}",
                         [_relative(p) for p in kv.sources(folder)],
                         depends=[_relative(p) for p in kv.headers(folder)])
        self.variant = variant


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _out_of_date(target: str, inputs: list[str]) -> bool:
    if not os.path.exists(target):
        return True
    built = os.path.getmtime(target)
    return any(os.path.getmtime(p) > built for p in inputs)


class BuildKernels(build_ext):
    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name and with its last part alone.
        names = {n for e in self.extensions if isinstance(e, KernelLibrary)
                 for n in (e.name, e.name.rpartition(".")[2])}
        if fullname in names:
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext) -> None:
        if not isinstance(ext, KernelLibrary):
            return super().build_extension(ext)
        target = self.get_ext_fullpath(ext.name)
        if not (self.force or _out_of_date(target, [*ext.sources, *ext.depends, __file__,
                                                     kv.__file__])):
            return
        variant = ext.variant
        macros = [("CONVEYOR_KERNELS_DIGEST", f'"{kv.sources_digest()}"'),
                  ("CONVEYOR_KERNELS_VARIANT", f'"{variant.name}"')]
        objects = []
        for source in ext.sources:
            flags = [*kv.COMPILE_FLAGS, *variant.compile_flags,
                     *kv.SOURCE_FLAGS.get(Path(source).name, ())]
            objects += self.compiler.compile(
                [source], output_dir=os.path.join(self.build_temp, variant.name),
                macros=macros, extra_postargs=flags, depends=ext.depends)
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        self.compiler.link_shared_object(objects, target, extra_postargs=list(kv.LINK_FLAGS))


# The kernels use OpenMP and GNU C; they are built and used on Linux only
# (on macOS the engine runs on Metal).
LIBRARIES = ([KernelLibrary(v) for v in kv.variants_for(kv.machine())]
             if sys.platform == "linux" else [])

setup(ext_modules=LIBRARIES, cmdclass={"build_ext": BuildKernels})
