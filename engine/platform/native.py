"""Small C libraries built at first use with the system C compiler.

MLX gives no way to add a CPU kernel, so the few the engine needs (the paged
attention in kvcache/cpu_paged_attention.c) are compiled here into Conveyor's
cache, once per source, flags and CPU, and loaded with ctypes. Without a
compiler `build_library` returns None and callers keep their portable path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from engine.platform import blas


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU sharing the cache folder.
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def openmp_link_args() -> list[str]:
    """Link OpenMP code against the runtime the BLAS already runs (MKL's
    libiomp5, which also serves gcc's GOMP calls): one pool of threads for
    matmuls and kernels. Two runtimes would each keep threads spinning after
    their work, fighting for the same cores."""
    loaded = blas.loaded()
    if loaded:
        folder = Path(loaded).parent
        if (folder / "libiomp5.so").exists():
            return [f"-L{folder}", "-liomp5", f"-Wl,-rpath,{folder}"]
    return ["-fopenmp"]


def _source_text(source: Path) -> bytes:
    """The source with the local files it includes (`#include "x"` beside it):
    all of it decides whether a cached build is still current."""
    text = source.read_bytes()
    for name in re.findall(rb'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M):
        included = source.parent / name.decode()
        if included.is_file():
            text += _source_text(included)
    return text


def build_library(name: str, source: Path, compile_args: list[str], link_args: list[str],
                  build_dir: Path) -> Path | None:
    """Compile `source` into a shared library under `build_dir` (reused when
    source, the files it includes, flags and CPU are unchanged); its path, or
    None if it can't be built."""
    cc = compiler()
    if cc is None:
        return None
    key = hashlib.sha256(_source_text(source) + repr(
        (cc, compile_args, link_args, _cpu_signature())).encode()).hexdigest()[:16]
    target = build_dir / f"{name}-{key}.so"
    if target.exists():
        return target
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # Build in a private folder and rename: a concurrent process never
        # loads a half-written library.
        with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
            obj, lib = Path(tmp) / "obj.o", Path(tmp) / "lib.so"
            for cmd in ([cc, *compile_args, "-fPIC", "-c", str(source), "-o", str(obj)],
                        [cc, "-shared", str(obj), "-o", str(lib), *link_args]):
                subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(lib, target)
    except (OSError, subprocess.SubprocessError):
        return None
    return target
