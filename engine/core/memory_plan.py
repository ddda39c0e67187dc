"""The memory plan: how many KV blocks an engine allocates, decided once
before its first step (vLLM's gpu_memory_utilization idea).

With no `kv_cache_bytes` given, the weights are already loaded when the plan
is made; one dummy step of `max_num_batched_tokens` tokens measures what a
step's activations add (engine/core/profile_step.py), and the pool gets

    utilization x the device's memory - what is in use - that peak

where the platform (engine/platform/) says what the device's memory is and
how the peak is measured: on a GPU all of its memory (default 0.9), on the
CPU the RAM available after loading (default 0.5, and at most 4 GiB unless
a utilization is given). No pool ever needs more blocks than max_num_seqs
sequences of max_model_len, so a plan stops there. A pool that cannot hold
one sequence of max_model_len is an error that names the options to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.errors import RequestError
from engine.platform.base import DeviceMemory, Platform
from kvcache.block_manager import most_blocks_held

# The request length the printed plan counts sequences at besides
# max_model_len: a chat turn's prompt and reply (DESIGN.md's mixed workload
# averages ~800 tokens).
TYPICAL_REQUEST_TOKENS = 1024


@dataclass(frozen=True)
class PoolShape:
    """What the plan sizes: blocks of `block_size` tokens, each costing
    `bytes_per_block` over all layers (K and V)."""

    block_size: int
    bytes_per_block: int
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    sliding_window: int | None = None  # on every layer: old blocks go back to the pool

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def blocks_per_sequence(self) -> int:
        """The most blocks one sequence of max_model_len holds at once."""
        return most_blocks_held(self.max_model_len, self.max_num_batched_tokens,
                                self.block_size, self.sliding_window)


@dataclass(frozen=True)
class MemoryPlan:
    """The KV pool an engine runs with, and why (printed before the first step)."""

    shape: PoolShape
    num_blocks: int
    basis: str  # how the budget was chosen, in words

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.shape.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.shape.bytes_per_block

    def sequences_at(self, length: int) -> int:
        """How many sequences of `length` tokens the pool holds at once (the
        scheduler also runs at most max_num_seqs)."""
        return self.num_blocks // self.shape.blocks_for(max(1, length))

    def describe(self, request_len: int | None = None) -> list[str]:
        """The printed plan: bytes, blocks, tokens, and how many sequences fit
        at max_model_len and at `request_len` (None: a typical request)."""
        s = self.shape
        per_token = s.bytes_per_block / s.block_size
        n = request_len or min(TYPICAL_REQUEST_TOKENS, s.max_model_len)
        what = "the average request" if request_len else "a typical request"
        return [f"memory plan: KV cache {_size(self.nbytes)} = {self.num_blocks:,} blocks of "
                f"{s.block_size} tokens = {self.num_tokens:,} tokens ({_size(per_token)} a token)",
                f"  holds {self.sequences_at(s.max_model_len):,} sequences of "
                f"{s.max_model_len:,} tokens (max_model_len) or {self.sequences_at(n):,} of "
                f"{n:,} ({what}) at once; max_num_seqs={s.max_num_seqs}",
                f"  budget: {self.basis}"]


def plan_memory(shape: PoolShape, platform: Platform, kv_cache_bytes: int | None,
                utilization: float | None,
                dummy_step: Callable[[int], Callable[[], None]]) -> MemoryPlan:
    """The plan for `shape` on `platform`: `kv_cache_bytes` as given, else
    `utilization` (None: the platform's) of the device's memory, less what
    is in use and a step's activations. `dummy_step(tokens)` prepares a step
    of `tokens` tokens (its pool included) and returns what runs it."""
    if kv_cache_bytes is not None and utilization is not None:
        raise RequestError("give kv_cache_bytes or gpu_memory_utilization, not both")
    memory = platform.device_memory()
    if kv_cache_bytes is not None:
        if memory is not None and kv_cache_bytes > memory.capacity:
            raise RequestError(
                f"kv_cache_bytes={kv_cache_bytes:,} is more than this device's {memory.name} "
                f"({_size(memory.capacity)}): lower --kv-cache-bytes, or leave it out and "
                f"the memory plan sizes the KV cache")
        budget, basis = kv_cache_bytes, "kv_cache_bytes as given"
    elif memory is None:
        budget = platform.kv_cache_bytes
        basis = f"the {platform.name} default (this device's memory is unknown here)"
    else:
        budget, basis = _measured_budget(shape, platform, memory, utilization, dummy_step)
    plan = MemoryPlan(shape, budget // shape.bytes_per_block, basis)
    if plan.num_blocks < shape.blocks_per_sequence():
        raise_ = ("--kv-cache-bytes" if kv_cache_bytes
                  else "--gpu-memory-utilization or give --kv-cache-bytes")
        fits = f" (to {plan.num_tokens:,} at most)" if plan.num_tokens else ""
        raise RequestError(
            f"the KV cache holds {plan.num_tokens:,} tokens ({_size(budget)}; {basis}), "
            f"less than one sequence of max_model_len={shape.max_model_len:,}: raise "
            f"{raise_}, or lower --max-model-len{fits}")
    return plan


def _measured_budget(shape: PoolShape, platform: Platform, memory: DeviceMemory,
                     utilization: float | None, dummy_step) -> tuple[int, str]:
    """utilization x the device's memory, less what is in use and a dummy
    step's activation peak (a shorter step scaled up where the platform says
    so), within the platform's ceiling and what max_num_seqs can use."""
    share = utilization or platform.memory_utilization
    steps = shape.max_num_batched_tokens
    probe = min(steps, platform.profile_tokens or steps)
    activations = -(-platform.peak_bytes_during(lambda: dummy_step(probe)) * steps // probe)
    budget = int(share * memory.capacity) - memory.in_use - activations
    in_use = f", less {_size(memory.in_use)} in use" if memory.in_use else ""
    scaled = f" ({probe:,} measured, scaled)" if probe < steps else ""
    basis = (f"{share:.2f} of {_size(memory.capacity)} {memory.name}{in_use} and "
             f"{_size(activations)} for a {steps:,}-token step's activations{scaled}")
    if budget <= 0:
        raise RequestError(f"the memory plan leaves no room for the KV cache ({basis}): "
                           "raise --gpu-memory-utilization, give --kv-cache-bytes or lower "
                           "--max-num-batched-tokens")
    one_sequence = shape.blocks_for(shape.max_model_len) * shape.bytes_per_block
    ceiling = platform.kv_cache_ceiling if utilization is None else None
    if ceiling is not None and budget > max(ceiling, one_sequence):
        budget = max(ceiling, one_sequence)
        basis += f", at most {_size(budget)} (--gpu-memory-utilization lifts it)"
    if budget > shape.max_num_seqs * one_sequence:
        budget = shape.max_num_seqs * one_sequence
        basis += (f", at most what {shape.max_num_seqs} sequences of "
                  f"{shape.max_model_len:,} tokens use")
    return budget, basis


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
