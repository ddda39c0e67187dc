"""Grammar engines side by side: llguidance, xgrammar and outlines-core on the
default model's tokenizer (SmolLM2, vocab 49152).

For each engine and each constraint kind it reports the compile time (fresh
compiler, so nothing is cached) and the mean and worst time to compute one
token mask while walking the tokens of a valid answer (mask, then advance).
This is how docs/structured_outputs.md chose the engine Conveyor ships with.

    PYTHONPATH=$PWD python -m bench.grammar_engines

Only llguidance is a Conveyor dependency; the others are measured when
installed (`pip install xgrammar==0.2.8 outlines-core==0.2.14`). xgrammar
imports torch at import time for type names only: where torch is absent a
stand-in module is registered so its C++ core can be measured anyway.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import types

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}
SCHEMA_ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "role": "admin",
                            "tags": ["math", "engines"],
                            "address": {"city": "London", "zip": "W1"}})
REGEX = r"\d{3}-\d{3}-\d{4}"
REGEX_ANSWER = "555-123-4567"
CHOICES = ["positive", "negative", "neutral"]
CHOICE_ANSWER = "negative"
# The same arithmetic grammar in each engine's notation.
LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER\nNUMBER: /[0-9]+/'
GBNF = 'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= [0-9]+'
GRAMMAR_ANSWER = "12+7-30"

CASES = [  # (kind, answer text)
    ("json schema", SCHEMA_ANSWER),
    ("regex", REGEX_ANSWER),
    ("choice", CHOICE_ANSWER),
    ("grammar", GRAMMAR_ANSWER),
]


def _tokenizer():
    from engine.loading.loader import resolve_model_path
    from engine.loading.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model_path(None))


def _walk(tokens: list[int], mask_fn, advance_fn) -> list[float]:
    """Seconds per mask while stepping through `tokens`."""
    times = []
    for token in tokens:
        t0 = time.perf_counter()
        mask_fn()
        times.append(time.perf_counter() - t0)
        advance_fn(token)
    return times


# -- llguidance ---------------------------------------------------------------

def measure_llguidance(tok) -> dict:
    import llguidance
    from llguidance import LLMatcher, LLTokenizer

    t0 = time.perf_counter()
    lltok = LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                        eos_token=sorted(tok.eos_token_ids))
    setup = time.perf_counter() - t0
    grammars = {
        "json schema": LLMatcher.grammar_from_json_schema(SCHEMA),
        "regex": LLMatcher.grammar_from_regex(REGEX),
        "choice": llguidance.grammar_from("choice", json.dumps(CHOICES)),
        "grammar": LLMatcher.grammar_from_lark(LARK),
    }
    out = {"setup_s": setup}
    for kind, answer in CASES:
        t0 = time.perf_counter()
        matcher = LLMatcher(lltok, grammars[kind], log_level=0)
        compile_s = time.perf_counter() - t0
        assert not matcher.is_error(), matcher.get_error()
        mask = np.zeros((1, (tok.vocab_size + 31) // 32), np.int32)
        from llguidance.numpy import fill_next_token_bitmask
        times = _walk(tok.encode(answer, add_special_tokens=False),
                      lambda: fill_next_token_bitmask(matcher, mask, 0),
                      lambda t: _check(matcher.consume_token(t)))
        out[kind] = (compile_s, times)
    return out


# -- xgrammar -----------------------------------------------------------------

def _stand_in_torch() -> None:
    """xgrammar names torch types at import; give it a module with those names."""
    if "torch" in sys.modules:
        return
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    os.environ["TVM_FFI_DISABLE_TORCH_C_DLPACK"] = "1"
    # transformers looks torch up by its import spec: let it see none first.
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast  # noqa: F401

    class _Names(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    fake = _Names("torch")
    fake.tensor = lambda *args, **kwargs: None
    sys.modules["torch"] = fake


def measure_xgrammar(tok) -> dict:
    _stand_in_torch()
    import xgrammar as xgr

    t0 = time.perf_counter()
    table = tok.byte_table()
    info = xgr.TokenizerInfo([t for t in table], vocab_type=xgr.VocabType.RAW,
                             vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_token_ids))
    setup = time.perf_counter() - t0
    out = {"setup_s": setup}
    choice_ebnf = "root ::= " + " | ".join(json.dumps(c) for c in CHOICES)
    for kind, answer in CASES:
        compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        t0 = time.perf_counter()
        if kind == "json schema":
            compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        elif kind == "regex":
            compiled = compiler.compile_regex(REGEX)
        elif kind == "choice":
            compiled = compiler.compile_grammar(choice_ebnf)
        else:
            compiled = compiler.compile_grammar(GBNF)
        compile_s = time.perf_counter() - t0
        matcher = xgr.GrammarMatcher(compiled)
        mask = np.zeros((1, (tok.vocab_size + 31) // 32), np.int32)
        times = _walk(tok.encode(answer, add_special_tokens=False),
                      lambda: matcher.fill_next_token_bitmask(mask, 0),
                      lambda t: _check(matcher.accept_token(t)))
        out[kind] = (compile_s, times)
    return out


# -- outlines-core --------------------------------------------------------------

def measure_outlines(tok) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    table = tok.byte_table()
    eos = min(tok.eos_token_ids)
    words: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        if i not in tok.eos_token_ids and b:
            words.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, words)
    setup = time.perf_counter() - t0
    regexes = {
        "json schema": build_regex_from_schema(json.dumps(SCHEMA)),
        "regex": REGEX,
        "choice": "(" + "|".join(CHOICES) + ")",
        "grammar": None,  # regular languages only: no context-free grammars
    }
    out = {"setup_s": setup}
    for kind, answer in CASES:
        if regexes[kind] is None:
            out[kind] = None
            continue
        t0 = time.perf_counter()
        index = Index(regexes[kind], vocab)
        compile_s = time.perf_counter() - t0
        guide = Guide(index)
        mask = np.zeros((tok.vocab_size + 31) // 32, np.int32)
        times = _walk(tok.encode(answer, add_special_tokens=False),
                      lambda: guide.write_mask_into(mask.ctypes.data, mask.size, 4),
                      lambda t: guide.advance(t))
        out[kind] = (compile_s, times)
    return out


def _check(ok: bool) -> None:
    if ok is False:
        raise RuntimeError("the engine refused a token of a valid answer")


ENGINES = {"llguidance": measure_llguidance, "xgrammar": measure_xgrammar,
           "outlines-core": measure_outlines}


REPEATS = 5  # whole measurements per engine; compile times are their median


def main() -> None:
    tok = _tokenizer()
    print(f"tokenizer vocab {tok.vocab_size}; times in ms, {REPEATS} runs (compile: median; "
          "mask: mean / max over the answer's tokens in every run)")
    print(f"{'engine':<14} {'kind':<12} {'compile':>9} {'mask mean':>10} {'mask max':>9} tokens")
    for name, measure in ENGINES.items():
        try:
            runs = [measure(tok) for _ in range(REPEATS)]
        except ImportError as exc:
            print(f"{name:<14} not installed ({exc})")
            continue
        setup = statistics.median(r["setup_s"] for r in runs)
        print(f"{name:<14} {'tokenizer':<12} {setup * 1e3:9.1f}")
        for kind, _ in CASES:
            if runs[0][kind] is None:
                print(f"{name:<14} {kind:<12} {'unsupported':>9}")
                continue
            compile_s = statistics.median(r[kind][0] for r in runs)
            times = [t for r in runs for t in r[kind][1]]
            print(f"{name:<14} {kind:<12} {compile_s * 1e3:9.1f} "
                  f"{statistics.mean(times) * 1e3:10.3f} {max(times) * 1e3:9.3f} "
                  f"{len(times) // REPEATS}")


if __name__ == "__main__":
    main()
