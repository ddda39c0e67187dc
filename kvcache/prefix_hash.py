"""Chained hashes of full KV blocks, for prefix caching. Pure Python.

Block i of a sequence holds tokens [i*B, (i+1)*B); its K/V depend on every
token before it, so its key is a digest of its parent's key and its own
tokens. Two sequences whose first k blocks have equal keys share the K/V of
those blocks. The digest is 128-bit BLAKE2b: an accidental collision (which
would hand one prompt another's K/V) is out of reach (~1e-20 at a billion
blocks), where Python's 64-bit `hash` would not be.
"""

from __future__ import annotations

import hashlib
from array import array

ROOT = b"conveyor-prefix-v1"  # the parent key of a sequence's first block


def block_key(parent: bytes, tokens) -> bytes:
    """The key of a full block with `tokens`, following the block keyed `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def chain_keys(token_ids, block_size: int, num_blocks: int, start: int = 0,
               parent: bytes = ROOT) -> list[bytes]:
    """Keys of full blocks start .. num_blocks-1 of `token_ids`, the first
    one chained to `parent` (the key of block start-1, or ROOT)."""
    keys = []
    for i in range(start, num_blocks):
        parent = block_key(parent, token_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys
