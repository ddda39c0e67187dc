"""The served models: the names a request may give as `model`, and the
engine or embedder behind them (loaded on first use where asked)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engine.entrypoints.serving.errors import model_not_found

DEFAULT_GENERATION_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_NAME = "all-MiniLM-L6-v2"


def short_name(model: str) -> str:
    """A model argument's short name: a .gguf file's stem, a directory's or
    repo id's last part."""
    path = Path(model.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else (path.name or model)


class ModelNames:
    """The names one model answers to; the first labels its responses."""

    def __init__(self, names: Sequence[str]):
        self.names = list(dict.fromkeys(n for n in names if n))
        if not self.names:
            raise ValueError("a served model needs a name")

    @classmethod
    def of(cls, model: str | None, *, served: str | None = None,
           default: str = DEFAULT_GENERATION_NAME) -> ModelNames:
        """`served` alone when given (--served-model-name); else the model
        argument as given and its short name; else `default`."""
        if served:
            return cls([served])
        if model is None:
            return cls([default])
        return cls([model, short_name(model)])

    @property
    def label(self) -> str:
        return self.names[0]

    def check(self, requested: str | None, what: str) -> str:
        """The label, if `requested` (None: any) names this model; else a 404."""
        if requested is None or requested in self.names:
            return self.label
        raise model_not_found(f"the model {requested!r} does not exist; the {what} model "
                              f"served here is {self.label!r}")


class _Loaded:
    """A value given now or made by `load()` on first use."""

    def __init__(self, value: Any = None, load: Callable[[], Any] | None = None):
        if (value is None) == (load is None):
            raise ValueError("give the value or a function that loads it, not both")
        self._value, self._load = value, load

    @property
    def loaded(self) -> bool:
        return self._value is not None

    def get(self) -> Any:
        if self._value is None:
            self._value = self._load()
        return self._value


class GenerationModel:
    """A generation engine (LLMEngine) and its names. What serving reads of
    it: the tokenizer, the context length, the vocabulary and `check_fits`."""

    def __init__(self, names: ModelNames, engine: Any = None, *,
                 load: Callable[[], Any] | None = None):
        self.names = names
        self._engine = _Loaded(engine, load)

    @property
    def engine(self) -> Any:
        return self._engine.get()

    @property
    def loaded(self) -> bool:
        return self._engine.loaded

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.scheduler.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.args.vocab_size

    def check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise scheduler.RequestTooLong if the request can never run."""
        self.engine.scheduler.check_fits(num_prompt_tokens, max_tokens)


class EmbeddingModel:
    """An embedder (anything with `dim`, `max_length` and `embed`) and its names."""

    def __init__(self, names: ModelNames, embedder: Any = None, *,
                 load: Callable[[], Any] | None = None):
        self.names = names
        self._embedder = _Loaded(embedder, load)

    @property
    def embedder(self) -> Any:
        return self._embedder.get()

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def max_length(self) -> int:
        return self.embedder.max_length
