"""Which builds of the native CPU kernels exist, and which one a CPU runs.

setup.py compiles every C file in kernels/ once per variant below into one
shared library each (engine/platform/_kernels_<variant>.so); engine/platform/
native.py picks the best variant this CPU's flags allow. Both read this file,
so it imports nothing beyond the standard library (setup.py loads it by path,
before Conveyor or its dependencies are installed).
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

KERNELS_DIR = Path(__file__).parent / "kernels"


@dataclass(frozen=True)
class Variant:
    name: str
    compile_flags: tuple[str, ...]  # instruction sets the compiler may use
    cpu_flags: frozenset[str]       # /proc/cpuinfo flags a CPU needs to run it


_AVX2 = ("-mavx2", "-mfma", "-mf16c")
# Best first. x86-64 only; every other machine gets the baseline alone.
X86_VARIANTS = (
    Variant("avx512", (*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
                       "-mavx512vnni"),
            frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                       "avx512_vnni"})),
    Variant("avx2", _AVX2, frozenset({"avx2", "fma", "f16c"})),
)
BASELINE = Variant("baseline", (), frozenset())

# Flags for every kernel source, and the extra ones a source asks for. The
# fast-math files rely on it to vectorise reductions, expf and lrintf (without
# it, quantizing a row called lrintf once a value); the sampler must not have
# it (its NaN / -inf tests would be optimised away).
COMPILE_FLAGS = ("-O3", "-fopenmp", "-std=gnu11")
SOURCE_FLAGS = {
    "cpu_paged_attention.c": ("-ffast-math",),
    "cpu_int8_matmul.c": ("-ffast-math",),
    "cpu_ops.c": ("-ffast-math",),
}
LINK_FLAGS = ("-fopenmp", "-lm", "-Wl,-z,defs", "-Wl,-Bsymbolic")


def is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "x86-64")


def variants_for(machine: str) -> tuple[Variant, ...]:
    """The variants built on (and for) a machine, best first."""
    return (*X86_VARIANTS, BASELINE) if is_x86(machine) else (BASELINE,)


def choose_variant(machine: str, cpu_flags: set[str] | frozenset[str]) -> Variant:
    """The best variant a CPU with these flags can run (always at least the
    baseline)."""
    return next(v for v in variants_for(machine) if v.cpu_flags <= cpu_flags)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty where unknown)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def machine() -> str:
    return platform.machine()


def library_name(variant: str) -> str:
    return f"_kernels_{variant}"


def sources(folder: Path = KERNELS_DIR) -> list[Path]:
    """The C files a library is linked from: every .c in kernels/. A new
    kernel joins by being there (and by a SOURCE_FLAGS line if it needs one)."""
    return sorted(folder.glob("*.c"))


def headers(folder: Path = KERNELS_DIR) -> list[Path]:
    return sorted(folder.glob("*.h"))


def sources_digest(folder: Path = KERNELS_DIR) -> str:
    """A digest of the kernels' sources and this file's build flags: compiled
    into each library, so a stale build (sources changed since) is caught at
    load instead of calling functions whose arguments have changed."""
    h = hashlib.sha256(repr((COMPILE_FLAGS, SOURCE_FLAGS, LINK_FLAGS)).encode())
    for path in [*sources(folder), *headers(folder)]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
