"""A temperature too small to divide by samples greedily (issue 16, defect 11).

Dividing logits by 1e-50 overflows float32 (the temperature itself rounds to
0), and the draw used to turn random. Below GREEDY_TEMPERATURE a row now takes
the argmax, alone or beside rows that really sample.
"""

import mlx.core as mx
import numpy as np
import pytest

from engine import SamplingParams
from engine.core import sampler
from engine.core.sampler import SamplingRow
from engine.core.sampling_params import GREEDY_TEMPERATURE
from engine.platform import cpu_sampling

TINY = [1e-50, 1e-38, 1e-30, 1e-6]


def test_the_threshold():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert not SamplingParams(temperature=0.7).greedy


@pytest.mark.parametrize("portable", [False, True], ids=["cpu-helper", "mlx"])
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_rows_take_the_argmax_beside_a_sampled_row(monkeypatch, portable, top_p):
    if portable:
        monkeypatch.setattr(cpu_sampling, "load", lambda threads=None: None)
    rng = np.random.default_rng(0)
    logits = mx.array(rng.normal(0, 3, (len(TINY) + 1, 4000)).astype(np.float32))
    argmax = np.array(mx.argmax(logits, axis=-1))
    normal = SamplingRow(SamplingParams(temperature=0.9, top_p=top_p, seed=7), 7, [1], [])
    rows = [SamplingRow(SamplingParams(temperature=t, top_p=top_p, seed=i), i, [1], [])
            for i, t in enumerate(TINY)] + [normal]
    batched = np.array(sampler.sample(logits, rows).token_ids)
    assert batched[:-1].tolist() == argmax[:-1].tolist()
    alone = np.array(sampler.sample(logits[-1:], [normal]).token_ids)
    assert batched[-1] == alone[0]
    # The sampled row really samples: over a few seeds it leaves the argmax.
    draws = {int(np.array(sampler.sample(logits[-1:], [SamplingRow(
        SamplingParams(temperature=0.9, top_p=top_p, seed=s), s, [1], [])]).token_ids)[0])
        for s in range(8)}
    assert len(draws) > 1


def test_engine_tiny_temperature_equals_greedy_alone_and_batched(tiny_llm):
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 256, size=12).tolist() for _ in range(2)]
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    tiny = SamplingParams(max_tokens=10, temperature=1e-50, seed=3, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)

    def ids(prompt_list, params):
        outs = tiny_llm.generate(prompt_list, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    expected = ids([prompts[0]], greedy)[0]
    sampled_alone = ids([prompts[1]], sampled)[0]
    assert ids([prompts[0]], tiny)[0] == expected
    together = ids(prompts, [tiny, sampled])
    assert together == [expected, sampled_alone]
    # The neighbour samples for real (it is not greedy in disguise).
    assert sampled_alone != ids([prompts[1]], greedy)[0]
