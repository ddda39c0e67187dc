"""Constrained decoding: a request's StructuredOutputsParams become a grammar
(llguidance; docs/structured_outputs.md says why this engine), compiled once
per distinct constraint and cached, and every constrained request gets its
own matcher that follows the tokens it accepts.

Per step the engine asks for the token masks of the rows that sample under a
constraint (`fill_bitmask`, computed on the host, in parallel) and the
sampler applies them; rows without a constraint cost nothing. Compiling runs
where the request is added (or earlier: the serving layer compiles on its
worker thread, so the engine thread finds the grammar cached).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from engine.core.sampling_params import StructuredOutputsParams
from engine.errors import RequestError

CACHE_SIZE = 256  # distinct compiled constraints kept (least recently used go first)
ANY_JSON_OBJECT = {"type": "object"}


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON text) for `params`; RequestError
    when the constraint is malformed before compiling (bad JSON, bad GBNF)."""
    import llguidance
    from llguidance import LLMatcher

    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            schema = ANY_JSON_OBJECT if kind == "json_object" else params.json
            if isinstance(schema, str):
                schema = json.loads(schema)
            if not isinstance(schema, (dict, bool)):
                raise ValueError("a JSON schema must be an object")
            # Fixed separators: a free choice of whitespace lets small models
            # loop on newlines; disable_any_whitespace drops the spaces too.
            compact = params.disable_any_whitespace
            options = {"whitespace_flexible": False, "coerce_one_of": True, "lenient": True,
                       "item_separator": "," if compact else ", ",
                       "key_separator": ":" if compact else ": "}
            return LLMatcher.grammar_from_json_schema(schema, overrides=options)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(params.regex)
        if kind == "choice":
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in params.choice))
        return llguidance.grammar_from("grammar", params.grammar)  # Lark or GBNF
    except (ValueError, TypeError) as exc:
        raise RequestError(f"invalid structured_outputs.{kind}: {exc}") from None


class StructuredOutputs:
    """One engine's grammar compiler, cache and mask filler. Thread-safe:
    the serving layer compiles on its threads while the engine steps."""

    def __init__(self, tokenizer: Any, vocab_size: int, cache_size: int = CACHE_SIZE):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.compiles = 0  # cache misses, for tests and stats

    @property
    def mask_words(self) -> int:
        """int32 words per row of a token bitmask."""
        return (self.vocab_size + 31) // 32

    def prepare(self) -> None:
        """Build what every grammar shares now (else at the first compile)."""
        self._tokenizer()

    def _tokenizer(self):
        # Built once (~0.3 s for a 49k vocabulary): the token trie every
        # matcher walks.
        with self._lock:
            if self._ll_tokenizer is None:
                from llguidance import LLExecutor, LLTokenizer

                tok = self.tokenizer
                self._ll_tokenizer = LLTokenizer(
                    tok.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=sorted(tok.eos_token_ids) or None)
                self._executor = LLExecutor()
            return self._ll_tokenizer

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled (never advanced) matcher for `params`, from the cache
        when the same constraint was compiled before; RequestError if invalid."""
        from llguidance import LLMatcher

        grammar = grammar_text(params)
        with self._lock:
            hit = self._compiled.get(grammar)
            if hit is not None:
                self._compiled.move_to_end(grammar)
                return hit
        matcher = LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise RequestError(f"invalid structured_outputs.{params.kind}: "
                               f"{matcher.get_error()}")
        with self._lock:
            self.compiles += 1
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return matcher

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A fresh matcher for one request (a copy of the compiled one)."""
        return self.compile(params).deep_copy()

    def fill_bitmask(self, matchers: list[Any]) -> np.ndarray:
        """[len(matchers), mask_words] int32: bit t % 32 of word t // 32 is
        set when token t may come next. Computed in parallel, GIL released."""
        from llguidance.numpy import fill_next_token_bitmask_par

        bitmask = np.empty((len(matchers), self.mask_words), np.int32)
        if not matchers:
            return bitmask
        self._tokenizer()
        fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)],
                                    bitmask)
        return bitmask
