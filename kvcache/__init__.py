"""KV memory: block bookkeeping (pure Python) and paged K/V storage (MLX)."""

from kvcache.block_manager import BlockManager, NoFreeBlocks

__all__ = ["BlockManager", "NoFreeBlocks"]
