"""Per-request sampling parameters (vLLM's names and defaults)."""

from __future__ import annotations

import msgspec

from engine.errors import RequestError

# Temperatures below this sample greedily (vLLM's rule): dividing logits by a
# smaller one overflows float32 (1e-50 is 0 there) and the draw turns random.
GREEDY_TEMPERATURE = 1e-5


class StructuredOutputsParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A constraint on what a request may generate (vLLM's shape): exactly one
    of a JSON schema (`json`, a dict or its JSON text), a regular expression,
    a list of `choice` strings, a Lark or GBNF `grammar`, or any JSON object
    (`json_object=True`). The engine compiles it once per distinct value and
    masks each step's logits to the tokens that keep the output valid."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # JSON without optional whitespace between tokens (vLLM's name).
    disable_any_whitespace: bool = False

    def __post_init__(self):
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object")
                 if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError("structured_outputs needs exactly one of json, regex, choice, "
                               f"grammar or json_object (got {', '.join(given) or 'none'})")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise RequestError("structured_outputs.choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in ("json", "regex", "choice", "grammar", "json_object")
                    if getattr(self, k) not in (None, False))


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to pick each token and when to stop. Validated on construction:
    a bad value raises RequestError (a ValueError) naming the field."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None    # None: none; 0: the sampled token's; k: plus top k
    skip_special_tokens: bool = True
    detokenize: bool = True        # False: token ids only (benchmarks, token-id clients)
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding

    def __post_init__(self):
        checks = [
            (self.n == 1, "n must be 1 (parallel sampling is not supported)"),
            (self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 (off) or positive"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be a non-negative integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)
        if self.stop and not self.detokenize:
            raise RequestError("stop strings need detokenize=True")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop and any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty")
        if self.top_k == -1:
            self.top_k = 0

    @property
    def greedy(self) -> bool:
        """True when the most likely token is taken: temperature 0, or one so
        small (< GREEDY_TEMPERATURE) that sampling at it is greedy in effect."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)
