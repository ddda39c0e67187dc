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


WORDS = ("the of and to in is was for on that with as by at from it an be this which or "
         "are have not had but were all one their has been more when there also new can "
         "time first into two other after some only over most such used many before may "
         "city school system world river music state team water light story house market "
         "model engine batch token memory queue worker stream server request").split()


def embed_texts(n: int = 4096, seed: int = 2) -> list[str]:
    """Texts of 5–200 words drawn from a fixed word list."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 201, size=n)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in lengths]
