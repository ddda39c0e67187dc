"""End to end on the default model (SmolLM2-135M-Instruct, GGUF Q4_1)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm_oracle import mlx_lm_greedy

from engine import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at a temperature of",
    "1, 2, 3, 4, 5,",
]


@pytest.fixture(scope="module")
def mlx_lm_fp32(smollm_dir):
    """mlx-lm's own model and KV cache on the same (dequantized) weights."""
    from mlx_lm.utils import dequantize_model, load_model

    model, _ = load_model(smollm_dir)
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model


def test_paris(smollm):
    out = smollm.generate(["The capital of France is"],
                          SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert out[0].outputs[0].text.startswith(" Paris.")


def test_greedy_tokens_match_mlx_lm(smollm, mlx_lm_fp32):
    tok = smollm.tokenizer
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = smollm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        assert ids[0] != tok.bos_token_id              # this GGUF adds no BOS
        assert out.outputs[0].token_ids == mlx_lm_greedy(mlx_lm_fp32, ids, 32), prompt


def test_batch_invariance_default_model(smollm):
    rng = np.random.default_rng(0)
    lengths = [1, 600] + rng.integers(2, 600, size=22).tolist()
    prompts = [rng.integers(1000, 40000, size=n).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, ignore_eos=True, max_tokens=int(m))
              for m in rng.integers(1, 8, size=24)]
    together = smollm.generate(prompts, params, use_tqdm=False)
    alone = [smollm.generate([p], [s], use_tqdm=False)[0] for p, s in zip(prompts, params)]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    assert smollm.engine.blocks.num_free == smollm.engine.blocks.num_blocks


def test_chat_template_generation(smollm):
    tok = smollm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Say hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    out = smollm.generate([tok.encode(text)], SamplingParams(temperature=0, max_tokens=40),
                          use_tqdm=False)[0].outputs[0]
    assert out.finish_reason in ("stop", "length") and out.text.strip()
    assert "<|im_end|>" not in out.text
