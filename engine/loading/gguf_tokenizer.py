"""A GGUF file's vocabulary rebuilt as a `tokenizers` tokenizer.json.

GGUF keeps the tokenizer as lists (tokenizer.ggml.tokens, token_type, and
merges or scores) named by `tokenizer.ggml.model`:
- "gpt2": byte-level BPE with merges (SmolLM2, Llama 3, Qwen2/2.5/3); the
  pre-tokenizer is named by `tokenizer.ggml.pre`.
- "llama": a SentencePiece BPE vocabulary (Llama 2, Mistral, Gemma, Phi-3):
  pieces with scores and `<0xNN>` byte pieces. SentencePiece merges the
  adjacent pair whose merged piece scores highest; as a BPE model that is a
  merge list ordered by the merged piece's score. Spaces are "▁", and
  `tokenizer.ggml.add_space_prefix` (default true) puts one before the text
  and after each added token, as llama.cpp does.
Control tokens become special tokens, user-defined ones added tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from engine.errors import ModelLoadError

# GGUF tokenizer token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)
MODELS = ("gpt2", "llama")
SPACE = "\u2581"  # SentencePiece's visible space

_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: Llama 3's with single digits.
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

Meta = Callable[[str, type, Any], Any]  # (key, kind, default) -> checked value


def build_tokenizer(path: Path, meta: Meta, max_length: int):
    """(tokenizers.Tokenizer, tokenizer_config, special_tokens_map) for the
    vocabulary in the metadata."""
    kind = meta("tokenizer.ggml.model", str, None)
    if kind not in MODELS:
        raise ModelLoadError(f"{path}: GGUF tokenizer model {kind!r} is not supported "
                             f"(supported: {', '.join(MODELS)})")
    tokens = meta("tokenizer.ggml.tokens", list, None)
    if tokens is None:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer vocabulary")
    types = meta("tokenizer.ggml.token_type", list, [TOKEN_NORMAL] * len(tokens))
    _check_items(path, "tokens", tokens, str)
    _check_items(path, "token_type", types, int)
    if len(types) != len(tokens):
        raise ModelLoadError(f"{path}: GGUF metadata tokenizer.ggml.token_type has "
                             f"{len(types)} entries for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # the first id wins if the GGUF repeats a token
    if kind == "gpt2":
        tok = _byte_level_bpe(path, meta, vocab)
    else:
        tok = _sentencepiece_bpe(path, meta, tokens, types, vocab)
    _add_special_tokens(tok, tokens, types, vocab)

    def name_of(key: str) -> str | None:
        value = meta(key, int, None)
        return tokens[value] if value is not None and 0 <= value < len(tokens) else None

    bos, eos = name_of("tokenizer.ggml.bos_token_id"), name_of("tokenizer.ggml.eos_token_id")
    pad = name_of("tokenizer.ggml.padding_token_id")
    unk = name_of("tokenizer.ggml.unknown_token_id")
    add_bos = meta("tokenizer.ggml.add_bos_token", bool, kind == "llama")
    add_eos = meta("tokenizer.ggml.add_eos_token", bool, False)
    tok.post_processor = _post_processor(kind, bos if add_bos else None,
                                         eos if add_eos else None, vocab)
    special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                     ("pad_token", pad), ("unk_token", unk)) if v}
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        **special_map,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    template = meta("tokenizer.chat_template", str, None)
    if template:
        tok_config["chat_template"] = template
    return tok, tok_config, special_map


def _check_items(path: Path, key: str, values: list, kind: type) -> None:
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{path}: GGUF metadata tokenizer.ggml.{key} must hold "
                             f"{kind.__name__} values")


def _byte_level_bpe(path: Path, meta: Meta, vocab: dict[str, int]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges = meta("tokenizer.ggml.merges", list, None)
    if merges is None:
        raise ModelLoadError(f"{path}: GGUF has no tokenizer merges")
    _check_items(path, "merges", merges, str)
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: malformed tokenizer merge {m!r}")
        pairs.append((left, right))
    pre = meta("tokenizer.ggml.pre", str, "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    normalizer, ignore_merges = None, False
    if pre == "smollm":
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        pre_tok = byte_level
    elif pre in ("llama-bpe", "llama3", "qwen2"):
        pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
        pre_tok = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        ignore_merges = pre != "qwen2"
        if pre == "qwen2":
            normalizer = normalizers.NFC()
    else:
        raise ModelLoadError(
            f"{path}: GGUF tokenizer pre-tokenizer {pre!r} is not supported "
            "(supported: smollm, gpt-2, default, llama-bpe, qwen2)")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                               ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float],
                         vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, ordered by
    the whole piece's score (highest first, then by the parts' ids), which is
    the order SentencePiece's BPE applies them in."""
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(path: Path, meta: Meta, tokens: list[str], types: list[int],
                       vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta("tokenizer.ggml.scores", list, None)
    if scores is None or len(scores) != len(tokens):
        raise ModelLoadError(f"{path}: GGUF metadata tokenizer.ggml.scores must give one "
                             "score for each token of a 'llama' (SentencePiece) vocabulary")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ModelLoadError(f"{path}: GGUF metadata tokenizer.ggml.scores must hold numbers")
    unk_id = meta("tokenizer.ggml.unknown_token_id", int, None)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    # Control, byte and unused pieces never come out of merging text.
    mergeable = {t: i for t, i in vocab.items() if types[i] in (TOKEN_NORMAL,
                                                                 TOKEN_USER_DEFINED)}
    model = models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores, mergeable),
                       unk_token=unk, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    prefix = meta("tokenizer.ggml.add_space_prefix", bool, True)
    # Spaces become "▁" and the text is never split before merging. As in
    # llama.cpp, each stretch of text gets the prefix space, also one that
    # follows an added token (normalizers run per stretch between them).
    steps = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _add_special_tokens(tok, tokens: list[str], types: list[int], vocab: dict[str, int]):
    from tokenizers import AddedToken

    specials, user_defined = [], []
    for i, (t, kind) in enumerate(zip(tokens, types)):
        if vocab.get(t) != i:
            continue
        if kind == TOKEN_CONTROL:
            specials.append(AddedToken(t, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            user_defined.append(AddedToken(t, special=False, normalized=False))
    if specials:
        tok.add_special_tokens(specials)
    if user_defined:
        tok.add_tokens(user_defined)


def _post_processor(kind: str, bos: str | None, eos: str | None, vocab: dict[str, int]):
    """BOS/EOS around the text as the GGUF asks (and byte-level offsets for
    "gpt2" vocabularies)."""
    from tokenizers import processors

    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    if bos or eos:
        first = f"{bos}:0 " if bos else ""
        last = f" {eos}:0" if eos else ""
        steps.append(processors.TemplateProcessing(
            single=f"{first}$A:0{last}",
            pair=f"{first}$A:0{last} {first.replace(':0', ':1')}$B:1{last.replace(':0', ':1')}",
            special_tokens=[(t, vocab[t]) for t in (bos, eos) if t]))
    if not steps:
        return None
    return steps[0] if len(steps) == 1 else processors.Sequence(steps)
