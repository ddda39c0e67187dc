"""The interface every attention backend implements (one file each beside
this one: portable.py, cpu.py, cuda.py).

The platform picks one backend per engine (engine/platform); the paged
cache binds it to its pools; each step the model runner hands it the
common metadata once (`build`), and every layer's cache view calls
`attend` with that step's backend metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from kvcache.attention.metadata import AttentionSpec, CommonAttentionMetadata

if TYPE_CHECKING:
    from kvcache.paged_cache import PagedKVCache, PagedLayerView


def split_qkv(qkv: mx.array, heads: int, kv_heads: int, head_dim: int,
              ) -> tuple[mx.array, mx.array, mx.array]:
    """q [N, heads, D], k and v [N, kv_heads, D] from a fused projection's
    rows [N, (heads + 2 kv_heads) D]: q's heads, then k's, then v's (the
    layout `attend_packed` takes)."""
    n, q_end = qkv.shape[0], heads * head_dim
    k_end = q_end + kv_heads * head_dim
    return (qkv[:, :q_end].reshape(n, heads, head_dim),
            qkv[:, q_end:k_end].reshape(n, kv_heads, head_dim),
            qkv[:, k_end:].reshape(n, kv_heads, head_dim))


class AttentionBackend:
    """Attention over the paged pools for one cache."""

    name = "abstract"
    # Decode-only steps may run as one compiled graph (decode_graph_inputs /
    # decode_metadata turn the metadata into graph inputs and back).
    compiled_decode = False
    # attend_host works on numpy arrays (a forward that runs outside MLX).
    host_attention = False

    def __init__(self, spec: AttentionSpec):
        self.spec = spec

    def bind(self, cache: PagedKVCache) -> None:
        """Called once by the cache this backend serves, after its pools exist."""

    def build(self, common: CommonAttentionMetadata) -> Any:
        """This backend's per-step metadata, shared by every layer."""
        raise NotImplementedError

    def attend(self, view: PagedLayerView, q: mx.array, k: mx.array, v: mx.array,
               scale: float, window: int | None = None,
               softcap: float | None = None) -> mx.array:
        """Store the step's k, v [N, kv_heads, D] in view's layer and attend
        q [N, heads, D]; [N, heads, D] in q's dtype. With `window`, a query
        sees only its `window` latest keys (itself included); with `softcap`,
        scores become softcap * tanh(scores / softcap) before the softmax."""
        raise NotImplementedError

    def packs_qkv(self, rope) -> bool:
        """Whether `attend_packed` takes a layer's fused q/k/v with this RoPE
        (None: no rotation) and rotates it itself."""
        return False

    def attend_packed(self, view: PagedLayerView, qkv: mx.array, heads: int, rope,
                      positions: mx.array, scale: float, window: int | None = None,
                      softcap: float | None = None) -> mx.array:
        raise NotImplementedError(f"the {self.name} attention backend takes q, k, v apart")

    def attend_host(self, view: PagedLayerView, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                    scale: float, window: int | None = None,
                    softcap: float | None = None) -> np.ndarray:
        raise NotImplementedError(f"the {self.name} attention backend has no host path")
