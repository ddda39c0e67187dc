"""The CUDA kernels' sources compile: each wrapped as mx.fast.cuda_kernel
wraps it (a templated __global__ function taking its inputs as const
pointers, a `<name>_shape` array where the source reads one, its outputs as
pointers) and built by nvcc for sm_90 (the H200) at the shapes the engine
launches. The CPU box cannot run them (their start-up `verify` and
bench/gpu_check.py check their arithmetic on the GPU), but a source that no
longer compiles, or an attention kernel that spills registers to local
memory, fails here.

MLX's own preamble is not available here; the wrapper includes the CUDA
half-precision headers the kernels rely on instead.
"""

import re
import shutil
import subprocess

import pytest

from engine.platform import cuda_norm
from kvcache.attention import cuda, cuda_rope, cuda_tensor_core

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")

_FLOAT_INPUTS = {"rope_cos", "rope_sin"}
_TYPED_INPUTS = {"q", "k_pool", "v_pool", "k_new", "v_new", "x", "delta", "weight"}
_LAYOUT = ["T", "D", "G", "KVH", "BS", "ROTATE", "TRAD", "SCALE_BITS", "CAP_BITS", "WINDOW",
           "Q_STRIDE", "K_STRIDE", "V_STRIDE", "Q_OFF", "K_OFF", "V_OFF"]


def _kernel(name: str, inputs: list[str], outputs: list[tuple[str, str]], source: str,
            params: list[str], instances: list[list]) -> str:
    args = [f"const {'T' if i in _TYPED_INPUTS else 'float' if i in _FLOAT_INPUTS else 'int'}"
            f"* {i}" for i in inputs]
    args += [f"const int* {shape}" for shape in sorted(set(re.findall(r"\w+_shape", source)))]
    args += [f"{kind}* {out}" for out, kind in outputs]
    template = ", ".join(("typename " if p == "T" else "int ") + p for p in params)
    text = f"template <{template}>\n__global__ void {name}({', '.join(args)}) {{\n{source}\n}}\n"
    nulls = ", ".join("nullptr" for _ in args)
    for j, values in enumerate(instances):
        assert len(values) == len(params)
        targs = ", ".join(map(str, values))
        text += f"void launch_{name}_{j}() {{ {name}<{targs}><<<1, 32>>>({nulls}); }}\n"
    return text


def _compile(tmp_path, text: str) -> str:
    src = tmp_path / "kernels.cu"
    src.write_text("#include <cuda_bf16.h>\n#include <cuda_fp16.h>\n" + text)
    run = subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(src), "-o",
                          str(tmp_path / "kernels.o"), "--resource-usage"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout + run.stderr


def _layout(dtype: str, dim: int, group: int, rotate: int, trad: int) -> list:
    # An 8B-shaped fused q/k/v row (strides and offsets in elements), scale 1/sqrt(128).
    return [dtype, dim, group, 8, 16, rotate, trad, 1035489772, 0, 0, 6144, 6144, 6144, 0,
            4096, 5120]


def _no_spills(report: str, kernels: int) -> None:
    usage = re.findall(r"(\d+) bytes spill stores", report)
    assert len(usage) == kernels and all(n == "0" for n in usage), report


def test_scalar_attention_kernel_compiles(tmp_path):
    params = _LAYOUT + ["NWARPS", "UNROLL", "SUB"]
    text = cuda_rope.HEADER + _kernel(
        "scalar", cuda._INPUTS["scalar"], [("out", "T")], cuda._SOURCE, params,
        [_layout("__nv_bfloat16", 128, 4, 1, 0) + [2, 2, 16],
         _layout("float", 256, 2, 1, 1) + [2, 2, 32],   # Gemma's head_dim, float32 pools
         _layout("__half", 64, 4, 0, 0) + [2, 2, 8]])
    _no_spills(_compile(tmp_path, text), 3)


def test_tensor_core_pair_compiles(tmp_path):
    store = _kernel("store", cuda._INPUTS["store"], [("stored", "int")],
                    cuda_tensor_core.STORE_SOURCE, _LAYOUT,
                    [_layout("__nv_bfloat16", 128, 4, 1, 0), _layout("__half", 64, 4, 1, 1)])
    attend = _kernel("attend", cuda._INPUTS["tensor_cores"], [("out", "T")],
                     cuda_tensor_core.SOURCE, _LAYOUT + ["NWARPS", "BF16", "PIPE", "STORE_OWN"],
                     [_layout("__nv_bfloat16", 128, 4, 1, 0) + [2, 1, 1, 0],
                      _layout("__nv_bfloat16", 128, 4, 1, 0) + [2, 1, 1, 1],  # decode steps
                      _layout("__nv_bfloat16", 128, 4, 1, 0) + [2, 1, 0, 0],
                      _layout("__half", 64, 16, 1, 1) + [4, 0, 1, 1],
                      _layout("__nv_bfloat16", 64, 3, 0, 0) + [1, 1, 0, 0]])
    _no_spills(_compile(tmp_path, cuda_tensor_core.HEADER + store + attend), 7)


def test_add_rms_norm_kernel_compiles(tmp_path):
    text = _kernel("add_rms_norm", ["x", "delta", "weight"], [("h_out", "T"), ("y_out", "T")],
                   cuda_norm._SOURCE, ["T", "D", "NT", "VEC", "EPS_BITS"],
                   [["__nv_bfloat16", 4096, cuda_norm.THREADS, 8, 925353388],
                    ["__half", 8192, cuda_norm.THREADS, 8, 925353388],
                    ["float", 2048, cuda_norm.THREADS, 8, 925353388],
                    ["__nv_bfloat16", 2050, cuda_norm.THREADS, 1, 925353388]])
    _compile(tmp_path, text)
