"""Admission policy for embedding requests: which texts share a forward pass.

An encoder has no KV cache and no decode steps: each text is one prefill, and
a batch costs (rows x longest row) padded tokens. Sorting by length and cutting
the sorted run into batches under a token budget keeps padding small and the
work per batch bounded. Pure Python, so the policy is tested without a model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class EmbeddingBatch:
    """Requests that run together, padded to `padded_length` tokens each."""

    indices: tuple[int, ...]  # request indices, longest first
    lengths: tuple[int, ...]  # their token counts, same order
    padded_length: int  # the row length of the batch (longest, rounded up)

    @property
    def rows(self) -> int:
        return len(self.indices)

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.padded_length

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_embedding_batches(
    items: Iterable[tuple[int, int]],
    *,
    token_budget: int,
    max_batch_size: int,
    pad_multiple: int = 1,
    max_padding: float = 0.1,
    min_batch_tokens: int | None = None,
) -> Iterator[EmbeddingBatch]:
    """Yield batches covering every `(request index, token count)` item once.

    Items are taken longest first. A batch's padded size (rows x its longest
    item, rounded up to `pad_multiple`) stays within `token_budget` and its
    rows within `max_batch_size`; an item longer than the budget runs alone.
    A batch also stops growing when padding would pass `max_padding` of its
    tokens, unless it is still small (`min_batch_tokens`, default budget/8):
    a few long texts then don't drag a crowd of short ones up to their length.
    Ties keep input order, so the plan is deterministic.
    """
    if token_budget < 1 or max_batch_size < 1 or pad_multiple < 1:
        raise ValueError("token_budget, max_batch_size and pad_multiple must be >= 1")
    if min_batch_tokens is None:
        min_batch_tokens = token_budget // 8
    order = sorted(items, key=lambda item: -item[1])
    start = 0
    while start < len(order):
        # The first item is the longest, so it fixes the row length.
        longest = max(order[start][1], 1)
        padded_length = round_up(longest, pad_multiple)
        rows_cap = max(1, min(max_batch_size, token_budget // padded_length))
        end, real = start + 1, order[start][1]
        while end < len(order) and end - start < rows_cap:
            rows, grown = end - start + 1, real + order[end][1]
            # Padding from mixing lengths, not from rounding up to pad_multiple.
            if grown < (1.0 - max_padding) * rows * longest and \
                    rows * padded_length > min_batch_tokens:
                break
            end, real = end + 1, grown
        chunk = order[start:end]
        yield EmbeddingBatch(
            indices=tuple(i for i, _ in chunk),
            lengths=tuple(n for _, n in chunk),
            padded_length=padded_length,
        )
        start = end


def padding_fraction(batches: Iterable[EmbeddingBatch]) -> float:
    """Share of the computed tokens that are padding (0 when nothing ran)."""
    padded = real = 0
    for batch in batches:
        padded += batch.padded_tokens
        real += batch.real_tokens
    return 0.0 if padded == 0 else 1.0 - real / padded
