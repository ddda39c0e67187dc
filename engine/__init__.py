"""Conveyor: a continuous-batching LLM inference engine on MLX.

Importing `engine` is cheap: the public names below are loaded on first use.
The one thing done at import is the platform bootstrap (engine/platform/blas.py),
which loads an optimised BLAS into the process while that can still matter.
"""

from __future__ import annotations

import importlib

from engine.platform import blas as _blas

_blas.preload()

# public name -> module that defines it
_EXPORTS = {
    "LLM": "engine.entrypoints.llm",
    "SamplingParams": "engine.core.sampling_params",
    "StructuredOutputsParams": "engine.core.sampling_params",
    "RequestOutput": "engine.core.outputs",
    "CompletionOutput": "engine.core.outputs",
    "ConveyorError": "engine.errors",
    "ModelLoadError": "engine.errors",
    "RequestError": "engine.errors",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def load(model=None, **kwargs):
    """Load a model and its tokenizer: `(model, tokenizer, config)`."""
    from engine.loading.loader import load_model, resolve_model_path
    from engine.loading.tokenizer import Tokenizer

    path = resolve_model_path(model)
    net, config = load_model(path, **kwargs)
    return net, Tokenizer.from_dir(path), config


__all__ = [*_EXPORTS, "load"]
