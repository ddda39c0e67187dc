"""Self-attention through the cache it is given.

Projections, optional per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE, then the
cache view attends: `cache.attend(q, k, v, scale, window, softcap)` on packed
[N, heads, dim] arrays (`attend_host` for host arrays). The layer never knows
whether the cache is paged, contiguous or absent (a whole prompt, for oracles).

`window` (a sliding window: each query sees its `window` latest keys, itself
included) and `softcap` (scores become `softcap * tanh(scores / softcap)`,
Gemma 2) are per layer; every attention backend honours both."""

from __future__ import annotations

from kvcache.attention.backend import split_qkv
from kvcache.attention.sdpa import causal_attention
from models.layers.base import Layer, is_host
from models.layers.linear import Linear
from models.layers.norm import RMSNorm
from models.layers.rope import RoPE


class Attention(Layer):
    project_host = None  # a platform's fused q/k/v projection for host arrays, if bound

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *,
                 rope: RoPE | None, bias: bool = False, out_bias: bool | None = None,
                 qk_norm_eps: float | None = None, qk_norm_offset: float = 0.0,
                 scale: float | None = None, fused_qkv: bool = False,
                 window: int | None = None, softcap: float | None = None):
        super().__init__()
        if window is not None and not (isinstance(window, int) and window > 0):
            raise ValueError(f"a sliding window must hold at least one token, not {window!r}")
        if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
            raise ValueError(f"attention soft-capping must be positive, not {softcap!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"{n_heads} attention heads do not share {n_kv_heads} KV heads")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window, self.softcap = window, softcap
        if fused_qkv:  # one projection whose rows are q's, then k's, then v's (Phi-3)
            self.qkv_proj = Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias)
        else:
            self.q_proj = Linear(dim, n_heads * head_dim, bias=bias)
            self.k_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
            self.v_proj = Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(n_heads * head_dim, dim, bias=bias if out_bias is None else out_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, qk_norm_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, qk_norm_offset)
        self.rope = rope

    def project(self, x):
        """q, k, v [N, heads, head_dim] for packed tokens x [N, dim]."""
        if self.project_host is not None and is_host(x):
            return self.project_host(x)
        if "qkv_proj" in self:
            return split_qkv(self.qkv_proj(x), self.n_heads, self.n_kv_heads, self.head_dim)
        n = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.reshape(n, self.n_heads, self.head_dim),
                k.reshape(n, self.n_kv_heads, self.head_dim),
                v.reshape(n, self.n_kv_heads, self.head_dim))

    def _packed(self, x, cache) -> bool:
        """Whether the cache takes the fused projection as the matmul leaves it
        and rotates it itself (CUDA: one kernel from the matmul to attention,
        where MLX launches each slice copy and RoPE on its own)."""
        packs = getattr(cache, "packs_qkv", None)
        return (packs is not None and "qkv_proj" in self and "q_norm" not in self
                and not is_host(x) and packs(self.rope))

    def forward(self, x, positions, cache=None):
        n = x.shape[0]
        if self._packed(x, cache):
            out = cache.attend_packed(self.qkv_proj(x), self.n_heads, self.rope, positions,
                                      self.scale, self.window, self.softcap)
            return self.o_proj(out.reshape(n, -1))
        q, k, v = self.project(x)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is None:
            out = causal_attention(q, k, v, self.scale, self.window, self.softcap)
        elif is_host(q):
            out = cache.attend_host(q, k, v, self.scale, self.window, self.softcap)
        else:
            out = cache.attend(q, k, v, self.scale, self.window, self.softcap)
        return self.o_proj(out.reshape(n, -1))
