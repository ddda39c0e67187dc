"""The native kernels: built at install, chosen per CPU, never compiled at run time.

On Linux x86-64 these tests fail (never skip) when the kernels are missing:
CI must not pass without the fast path."""

import ctypes
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import write_quantized, write_tiny_llama

from engine.platform import blas, kernel_variants, native
from engine.platform.kernel_variants import choose_variant

LINUX_X86 = sys.platform == "linux" and kernel_variants.is_x86(platform.machine())
AVX512 = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}


# -- choosing a variant from the CPU's flags -----------------------------------

@pytest.mark.parametrize("flags,want", [
    (AVX512 | {"sse2", "avx512cd", "avx_vnni"}, "avx512"),
    (AVX512 - {"avx512_vnni"}, "avx2"),          # AVX-512 without VNNI (Skylake-X)
    (AVX512 - {"avx512bw"}, "avx2"),
    ({"avx", "avx2", "fma", "f16c", "avx_vnni"}, "avx2"),  # AVX-VNNI is not AVX-512 VNNI
    ({"avx", "avx2", "fma"}, "baseline"),        # no F16C
    ({"sse2", "sse4_2", "avx"}, "baseline"),
    (set(), "baseline"),
])
def test_x86_variant_follows_the_flags(flags, want):
    assert choose_variant("x86_64", frozenset(flags)).name == want


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le"])
def test_other_machines_get_the_baseline(machine):
    assert choose_variant(machine, frozenset(AVX512)).name == "baseline"
    assert [v.name for v in kernel_variants.variants_for(machine)] == ["baseline"]


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx2 fma f16c\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse2 avx2 fma f16c\n")
    assert kernel_variants.cpu_flags(info) == {"fpu", "sse2", "avx2", "fma", "f16c"}
    assert kernel_variants.cpu_flags(tmp_path / "missing") == frozenset()


def test_every_kernel_source_is_built():
    """A new kernels/*.c joins the build by being there."""
    names = {p.name for p in kernel_variants.sources()}
    assert {"cpu_paged_attention.c", "cpu_int8_matmul.c", "cpu_sampling.c", "blas.c"} <= names
    assert set(kernel_variants.SOURCE_FLAGS) <= names


def test_digest_follows_the_sources(tmp_path):
    (tmp_path / "a.c").write_text("int a(void) { return 1; }\n")
    (tmp_path / "a.h").write_text("int a(void);\n")
    first = kernel_variants.sources_digest(tmp_path)
    (tmp_path / "a.h").write_text("int a(void); /* changed */\n")
    assert kernel_variants.sources_digest(tmp_path) != first


# -- the libraries built at install --------------------------------------------

needs_linux_x86 = pytest.mark.skipif(not LINUX_X86, reason="kernels are built for Linux x86-64")


@needs_linux_x86
def test_library_for_this_cpu_loads_from_the_package():
    kernels = native.load()
    assert kernels.library is not None, kernels.reason
    expected = choose_variant(platform.machine(), kernel_variants.cpu_flags()).name
    assert kernels.variant == expected
    lib = kernels.library
    lib.conveyor_kernels_variant.restype = ctypes.c_char_p
    assert lib.conveyor_kernels_variant().decode() == expected
    assert Path(lib._name).parent == Path(native.__file__).parent


@needs_linux_x86
def test_every_variant_this_cpu_runs_loads():
    flags = kernel_variants.cpu_flags()
    runnable = [v.name for v in kernel_variants.variants_for(platform.machine())
                if v.cpu_flags <= flags]
    assert "baseline" in runnable
    for name in runnable:
        kernels = native.load(name)
        assert kernels.library is not None, kernels.reason
        kernels.library.conveyor_kernels_variant.restype = ctypes.c_char_p
        assert kernels.library.conveyor_kernels_variant().decode() == name


def test_a_variant_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setattr(kernel_variants, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(kernel_variants, "machine", lambda: "x86_64")
    monkeypatch.setattr(sys, "platform", "linux")
    kernels = native.load.__wrapped__("avx2")
    assert kernels.library is None and "no f16c" in kernels.reason
    assert "no native kernel variant 'sve'" in native.load.__wrapped__("sve").reason


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("CONVEYOR_KERNELS", "off")
    kernels = native.load.__wrapped__()
    assert kernels.library is None and "CONVEYOR_KERNELS=off" in kernels.reason


@needs_linux_x86
def test_a_build_older_than_its_sources_is_refused(monkeypatch):
    monkeypatch.setattr(kernel_variants, "sources_digest", lambda folder=None: "0" * 16)
    kernels = native._open("baseline")
    assert kernels.library is None and "older than their sources" in kernels.reason


@needs_linux_x86
def test_the_preloaded_blas_sgemm_is_handed_over():
    lib = native.library()
    assert lib is not None, native.load().reason
    assert blas.loaded() is not None, "no BLAS preloaded"
    handed = ctypes.c_void_p.in_dll(lib, "conveyor_sgemm").value
    assert handed == blas.sgemm_address() != 0


@needs_linux_x86
def test_kernels_run_on_mkls_openmp_runtime():
    """MKL's threads and the kernels' are one pool: two runtimes kept idle
    threads spinning against each other on the same cores."""
    if not (blas.loaded() and "mkl" in blas.loaded()):
        pytest.skip("MKL is not the preloaded BLAS")
    assert blas.openmp_runtime() is not None and "libiomp5" in blas.openmp_runtime()
    assert native.shares_blas_openmp()


# -- a whole run without a compiler in reach -----------------------------------

CHILD = r"""
import ctypes, json, sys
import engine
from engine import LLM, SamplingParams
from engine.platform import blas, cpu_sampling, int8_matmul, native
import mlx.core as mx

kernels = native.load()
# A float32 matmul through MLX: MKL starts its threads (and OpenMP runtime).
mx.eval(mx.ones((512, 512)) @ mx.ones((512, 512)))
report = {"variant": kernels.variant, "reason": kernels.reason,
          "openmp_shared": native.shares_blas_openmp(),
          "sampling": cpu_sampling.load() is not None, "int8": int8_matmul.load() is not None}
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
for name, path in (("float", sys.argv[1]), ("quantized", sys.argv[2])):
    llm = LLM(path, kv_cache_bytes=16 << 20)
    out = llm.generate([[1, 2, 3, 4, 5]], params, use_tqdm=False)
    engine_ = llm.engine
    report[name] = {
        "attention": engine_.cache.backend.name == "cpu",
        "host_forward": engine_.runner.host_forward is not None,
        "int8_layers": type(engine_.model.model.layers[0].mlp.down_proj).__name__,
        "tokens": out[0].outputs[0].token_ids,
    }
if blas.loaded() and "mkl" in blas.loaded():
    # MKL opens its threading layer lazily: make it commit to one now.
    ctypes.CDLL(blas.loaded()).MKL_Get_Max_Threads()
report["maps"] = sorted({line.split()[-1] for line in open("/proc/self/maps")
                         if line.rstrip().endswith(".so") or ".so." in line})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    dense = write_tiny_llama(root / "dense")
    src = write_tiny_llama(root / "src", tie_word_embeddings=True)
    return dense, write_quantized(src, root / "q", embedding=True)


@needs_linux_x86
def test_fast_path_runs_with_no_compiler_reachable(models, tmp_path):
    """No compiler on PATH, CC=/bin/false and a fresh HOME: every kernel still
    runs (nothing is compiled at run time), nothing is read from or written to
    ~/.cache/conveyor/kernels, and MKL shares our kernels' OpenMP runtime."""
    empty = tmp_path / "bin"
    empty.mkdir()
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CONVEYOR_CACHE", "MKL_THREADING_LAYER", "CONVEYOR_KERNELS",
                        "LD_PRELOAD")}
    env.update(PATH=str(empty), CC="/bin/false", HOME=str(home),
               PYTHONPATH=str(Path(native.__file__).parents[2]))
    proc = subprocess.run([sys.executable, "-c", CHILD, *map(str, models)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = choose_variant(platform.machine(), kernel_variants.cpu_flags()).name
    assert report["variant"] == expected, report["reason"]
    assert report["sampling"]
    assert report["float"]["attention"] and report["float"]["host_forward"]
    assert report["quantized"]["attention"] and report["quantized"]["host_forward"]
    vnni = expected == "avx512"
    assert report["int8"] == vnni
    assert (report["quantized"]["int8_layers"] == "Int8Linear") == vnni
    assert all(len(report[m]["tokens"]) == 6 for m in ("float", "quantized"))
    maps = report["maps"]
    ours = [m for m in maps if "_kernels_" in m]
    assert ours == [str(native.library_path(expected))]
    assert not any("conveyor/kernels" in m for m in maps)
    assert not (home / ".cache" / "conveyor" / "kernels").exists()
    if blas.loaded() and "mkl" in blas.loaded():
        # one OpenMP runtime, MKL's, for its threads and ours
        assert report["openmp_shared"], maps
        assert any("libmkl_intel_thread" in m for m in maps), maps
        assert not any("libmkl_gnu_thread" in m for m in maps), maps
