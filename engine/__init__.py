"""Conveyor: a continuous-batching LLM inference engine on MLX."""

from engine import blas as _blas

_blas.preload()  # must precede the first `import mlx.core` anywhere

from engine.errors import ConveyorError, ModelLoadError, RequestError  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.outputs import CompletionOutput, RequestOutput  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def load(model=None, **kwargs):
    """Load a model and its tokenizer: `(model, tokenizer, config)`."""
    from engine.loader import load_model, resolve_model_path
    from engine.tokenizer import Tokenizer

    path = resolve_model_path(model)
    net, config = load_model(path, **kwargs)
    return net, Tokenizer.from_dir(path), config


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "ConveyorError",
           "ModelLoadError", "RequestError", "load"]
