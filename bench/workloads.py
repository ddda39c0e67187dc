"""The standard workloads of DESIGN.md, defined once for every benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def decode_heavy(n: int = 64, input_len: int = 128, output_len: int = 128) -> Workload:
    """N prompts of random ids in [1000, 40000), exactly `output_len` new tokens each."""
    ids = np.random.default_rng(0).integers(1000, 40000, size=(n, input_len))
    return Workload("decode-heavy", ids.tolist(), [output_len] * n)


def mixed(n: int = 256) -> Workload:
    """Prompt lengths uniform in [16, 1024], output lengths in [16, 512], all at t=0."""
    rng = np.random.default_rng(1)
    in_lens = rng.integers(16, 1025, size=n)
    out_lens = rng.integers(16, 513, size=n)
    prompts = [rng.integers(1000, 40000, size=int(k)).tolist() for k in in_lens]
    return Workload("mixed", prompts, [int(k) for k in out_lens])


def shared_prefix(n: int = 64, prefix_len: int = 1024, unique_len: int = 32,
                  output_len: int = 32) -> Workload:
    """One `prefix_len`-token prefix (default_rng(0)) + `unique_len` tokens of
    each request's own; `output_len` new tokens each."""
    rng = np.random.default_rng(0)
    prefix = rng.integers(1000, 40000, size=prefix_len).tolist()
    tails = rng.integers(1000, 40000, size=(n, unique_len)).tolist()
    return Workload("shared-prefix", [prefix + t for t in tails], [output_len] * n)


def document_qa(docs: int = 8, questions: int = 8, doc_len: int = 512, question_len: int = 24,
                output_len: int = 32) -> Workload:
    """`docs` documents with `questions` questions each (default_rng(3)); each
    request is one document followed by one of its questions."""
    rng = np.random.default_rng(3)
    prompts = []
    for _ in range(docs):
        doc = rng.integers(1000, 40000, size=doc_len).tolist()
        prompts += [doc + rng.integers(1000, 40000, size=question_len).tolist()
                    for _ in range(questions)]
    return Workload("document-qa", prompts, [output_len] * len(prompts))


# The embed workload (4,096 texts of 5-200 words) lives with its benchmark:
# bench/embed.py, make_texts().
