"""Fuzz campaigns over model files, run as a child process by
tests/test_model_file_fuzz.py (so a crash, a hang or runaway memory fails the
test instead of taking pytest down).

    python tests/model_file_fuzz.py {gguf,safetensors,config} EXAMPLES SEED

Every example must either load or raise ModelLoadError. One JSON line per
example ({"case", "outcome"}) is printed as it finishes, then a summary line
({"counts", "failures", "max_rss_kb"}). The address space is capped, so an
allocation a hostile file talks the loader into fails here, visibly.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

ADDRESS_SPACE_CAP = 6 << 30

# Values that break naive readers when they land on a count, length or offset.
EXTREMES = [0, 1, 2, 3, 7, 31, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 3_000_000,
            2**62, 2**63, 2**64 - 1]


def mutate(data: bytes, regions: list[tuple[int, int]], rng: np.random.Generator) -> bytes:
    """1-3 random edits, each in one of `regions` (byte spans): byte flips, an
    extreme 4- or 8-byte integer written over any position, or a truncation."""
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        start, end = regions[int(rng.integers(0, len(regions)))]
        where = int(rng.integers(start, end))
        kind = rng.random()
        if kind < 0.45:
            for _ in range(int(rng.integers(1, 5))):
                at = min(len(buf) - 1, where + int(rng.integers(0, 16)))
                buf[at] = int(rng.integers(0, 256))
        elif kind < 0.9:
            width = 8 if rng.random() < 0.5 else 4
            value = int(rng.choice(EXTREMES)) % (1 << (8 * width))
            buf[where:where + width] = value.to_bytes(width, "little")
        else:
            del buf[where:]
            break
    return bytes(buf)


def odd_value(rng: np.random.Generator):
    """A metadata or header value a reader may not expect."""
    pick = int(rng.integers(0, 6))
    if pick == 0:
        return int(rng.choice(EXTREMES[:11]))  # within a uint32 (the writer's int type)
    if pick == 1:
        return float(rng.choice([0.0, -1.0, 1e-30, 1e30, float("inf"), float("nan")]))
    if pick == 2:
        return str(rng.choice(["", "llama", "x" * 300, "\u00e9"]))
    if pick == 3:
        return bool(rng.random() < 0.5)
    if pick == 4:
        return [int(v) for v in rng.integers(-5, 5, size=int(rng.integers(1, 4)))]
    return ["a", "b c"]


def attempt(load) -> str:
    from engine.errors import ModelLoadError

    try:
        load()
        return "loaded"
    except ModelLoadError as exc:
        if "\n" in str(exc):
            return f"multi-line ModelLoadError: {exc!r}"[:400]
        return "ModelLoadError"
    except Exception as exc:  # noqa: BLE001 - any other exception is the finding
        last = traceback.format_exc().strip().splitlines()[-3:]
        return f"{type(exc).__name__}: {' | '.join(last)}"[:400]


def gguf_campaign(examples: int, seed: int, work: Path) -> list[str]:
    """Byte edits of a valid tiny GGUF (in its scalar metadata, its vocabulary,
    its tensor records or anywhere), and files rewritten with odd metadata."""
    from test_gguf_import import tiny_llama

    from engine.loading.gguf import import_gguf
    from engine.loading.gguf_header import read_gguf_header
    from engine.loading.loader import load_model

    pristine = work / "pristine.gguf"
    tiny_llama(pristine)
    data = pristine.read_bytes()
    header = read_gguf_header(pristine)
    vocab = data.index(b"tokenizer.ggml.tokens")
    records = data.index(b"token_embd.weight", vocab) - 8
    header_end = min(t.offset for t in header.tensors.values())
    regions = [(0, vocab), (vocab, records), (records, header_end), (0, len(data))]
    keys = sorted(header.metadata)
    rng = np.random.default_rng(seed)
    outcomes = []
    for case in range(examples):
        src, out = work / f"case{case}.gguf", work / f"case{case}"
        if rng.random() < 0.3:
            overrides = {str(rng.choice(keys)): odd_value(rng)
                         for _ in range(int(rng.integers(1, 3)))}
            tiny_llama(src, meta_overrides=overrides)
        else:
            src.write_bytes(mutate(data, regions, rng))
        outcomes.append(report(case, attempt(lambda: load_model(import_gguf(src, out)))))
        src.unlink()
        shutil.rmtree(out, ignore_errors=True)
    return outcomes


def edit_safetensors_header(data: bytes, rng: np.random.Generator) -> bytes:
    """The file with one tensor entry of its JSON header changed (a shape, an
    offset, the dtype, the name, or gone), the header length kept right."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[int(rng.integers(0, len(names)))]
    entry = header[name]
    pick = int(rng.integers(0, 5))
    if pick == 0:
        entry["shape"][int(rng.integers(0, len(entry["shape"])))] = int(rng.choice(EXTREMES))
    elif pick == 1:
        entry["data_offsets"][int(rng.integers(0, 2))] = int(rng.choice(EXTREMES))
    elif pick == 2:
        entry["dtype"] = str(rng.choice(["F16", "BF16", "U8", "I64", "F64", "F99", ""]))
    elif pick == 3:
        header[re.sub(r"\d+", str(rng.choice(EXTREMES)), name, count=1)] = header.pop(name)
    else:
        del header[name]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def safetensors_campaign(examples: int, seed: int, work: Path) -> list[str]:
    """Byte edits of a valid tiny safetensors file and edits of its header."""
    from tiny_models import write_tiny_llama

    from engine.loading.loader import load_model

    pristine = write_tiny_llama(work / "pristine")
    weights = next(pristine.glob("*.safetensors"))
    data = weights.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    regions = [(0, 8), (8, header_end), (0, len(data))]
    rng = np.random.default_rng(seed)
    case_dir = work / "case"
    shutil.copytree(pristine, case_dir)
    target = case_dir / weights.name
    outcomes = []
    for case in range(examples):
        if rng.random() < 0.4:
            target.write_bytes(edit_safetensors_header(data, rng))
        else:
            target.write_bytes(mutate(data, regions, rng))
        outcomes.append(report(case, attempt(lambda: load_model(case_dir))))
    return outcomes


def config_campaign(examples: int, seed: int, work: Path) -> list[str]:
    """Hypothesis replaces config.json values of a float and of a quantized
    tiny checkpoint with arbitrary JSON values."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st
    from tiny_models import write_quantized, write_tiny_llama

    from engine.loading.loader import load_model

    dirs = [write_tiny_llama(work / "float")]
    dirs.append(write_quantized(dirs[0], work / "quantized"))
    bases = [json.loads((d / "config.json").read_text()) for d in dirs]
    keys = sorted(bases[1]) + ["head_dim", "rope_scaling", "text_config", "pad_token_id",
                               "attention_bias", "quantization_config"]
    leaves = (st.none() | st.booleans() | st.sampled_from(EXTREMES) | st.integers(-2**70, 2**70)
              | st.floats() | st.text(max_size=4)
              | st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, -1, 1e-5, "linear", "llama3"]))
    subkeys = st.sampled_from(["type", "rope_type", "factor", "bits", "group_size", "mode",
                               "low_freq_factor", "high_freq_factor", "hidden_size",
                               "num_hidden_layers", "model.layers.0.mlp.up_proj",
                               "model.layers.0.mlp.down_proj", "lm_head"])
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(subkeys, inner, max_size=3), max_leaves=6)
    outcomes: list[str] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, 1), st.dictionaries(st.sampled_from(keys), values, min_size=1,
                                              max_size=4))
    def check(which, changes):
        config = {**bases[which], **changes}
        (dirs[which] / "config.json").write_text(json.dumps(config))
        outcome = attempt(lambda: load_model(dirs[which]))
        outcomes.append(report(len(outcomes), outcome, (which, changes)))

    check()
    return outcomes


def report(case: int, outcome: str, example=None) -> str:
    line = {"case": case, "outcome": outcome}
    if example is not None and outcome not in ("loaded", "ModelLoadError"):
        line["example"] = repr(example)[:300]
    print(json.dumps(line), flush=True)
    return outcome


CAMPAIGNS = {"gguf": gguf_campaign, "safetensors": safetensors_campaign,
             "config": config_campaign}


def main(argv: list[str]) -> int:
    name, examples, seed = argv[0], int(argv[1]), int(argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > ADDRESS_SPACE_CAP:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, hard))
    import mlx.core as mx

    import engine  # noqa: F401 - loads the BLAS before MLX, as pytest does

    mx.set_cache_limit(0)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        outcomes = CAMPAIGNS[name](examples, seed, Path(tmp))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = outcome if outcome in ("loaded", "ModelLoadError") else "other"
        counts[key] = counts.get(key, 0) + 1
    failures = [o for o in outcomes if o not in ("loaded", "ModelLoadError")]
    print(json.dumps({"counts": counts, "failures": failures[:20],
                      "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
