"""bench/gpu_trace.py's arithmetic on a hand-made trace: a step's GPU-busy
time is the union of its kernels (overlaps counted once, gaps not at all),
and kernels and API calls belong to the step they start in."""

from bench.gpu_trace import per_step


def _x(cat, name, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_busy_time_is_the_union_of_kernels():
    events = [_x("user_annotation", "step0", 0, 100), _x("user_annotation", "step1", 100, 50),
              _x("kernel", "gemm", 10, 20), _x("kernel", "attn", 25, 15),  # overlap: 10-40
              _x("kernel", "gemm", 60, 10),                               # gap, then 60-70
              _x("kernel", "norm", 120, 5),
              _x("cuda_runtime", "cudaGraphLaunch", 5, 3),
              _x("cuda_runtime", "cudaGraphLaunch", 101, 2),
              _x("cpu_op", "ignored", 0, 1000)]
    first, second = per_step(events)
    assert first["busy_ms"] == 0.04 and first["counts"] == {"gemm": 2, "attn": 1}
    assert first["kernels"]["gemm"] == 30 and first["api"] == {"cudaGraphLaunch": 3}
    assert second["busy_ms"] == 0.005 and second["wall_ms"] == 0.05
