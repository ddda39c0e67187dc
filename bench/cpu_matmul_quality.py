"""How far each CPU matmul choice moves the default model's logits.

Teacher-forced over sampled continuations of a few prompts, every position's
logits from `--cpu-matmul int16` / `int8` are compared with the float32 path
(the checkpoint dequantized, exact activations), and so are mlx-lm's as it
loads the same checkpoint (4-bit weights, float16 activations):
top-1 agreement, mean KL(float32 || choice) and the largest logit difference.

    python -m bench.cpu_matmul_quality      (~1 minute on 2 cores)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

PROMPTS = ["Once upon a time", "The history of Rome", "Explain photosynthesis.",
           "def quicksort(a):", "My favourite recipe is", "The stock market today"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def main() -> None:
    from mlx_lm.utils import load_model as mlx_lm_load

    from engine import LLM, SamplingParams
    from engine.loading.loader import load_model, resolve_model_path

    path = resolve_model_path(None)
    exact = LLM(cpu_matmul="float32")
    outs = exact.generate(PROMPTS, SamplingParams(max_tokens=200, temperature=0.8, seed=1),
                          use_tqdm=False)
    sequences = [o.prompt_token_ids + o.outputs[0].token_ids for o in outs]
    reference = exact.engine.model
    peers = {c: (load_model(path, cpu_matmul=c)[0], False) for c in ("int16", "int8")}
    peers["mlx-lm 4-bit"] = (mlx_lm_load(path)[0], True)

    def logits(model, ids, batched):
        x = mx.array(ids)
        return np.array((model(x[None])[0] if batched else model(x)).astype(mx.float32))

    print(f"# {sum(map(len, sequences))} positions, reference: float32 weights and activations")
    print(f"{'choice':<14} {'top-1 agree':>11} {'mean KL':>10} {'max |dlogit|':>13}")
    for name, (model, batched) in peers.items():
        agree, kl, worst = [], [], 0.0
        for ids in sequences:
            ref, got = logits(reference, ids, False), logits(model, ids, batched)
            lp, lq = _log_softmax(ref), _log_softmax(got)
            agree.append((ref.argmax(1) == got.argmax(1)).mean())
            kl.append((np.exp(lp) * (lp - lq)).sum(1).mean())
            worst = max(worst, float(np.abs(got - ref).max()))
        print(f"{name:<14} {100 * np.mean(agree):>10.2f}% {np.mean(kl):>10.2e} {worst:>13.3f}")


if __name__ == "__main__":
    main()
