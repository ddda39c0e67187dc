"""Loading checkpoints: formats, quantization, and clear errors for bad input."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from tiny_models import write_quantized, write_tiny_llama

from engine.entrypoints.cli import main
from engine.errors import ModelLoadError
from engine.loading.loader import load_model, resolve_model_path
from engine.platform import int8_matmul
from engine.platform.int8_linear import Int8Linear
from models.layers.linear import Linear

IDS = mx.array([5, 6, 7, 100, 200, 3, 9, 11, 42, 250], dtype=mx.int32)


def mlx_lm_logits(path):
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(path)
    return np.array(model(IDS[None])[0])


@pytest.mark.parametrize("shards", [1, 3])
def test_logits_match_mlx_lm(tmp_path, shards):
    path = write_tiny_llama(tmp_path / "m", shards=shards)
    assert len(list(path.glob("*.safetensors"))) == shards
    model, _ = load_model(path)
    np.testing.assert_allclose(np.array(model(IDS)), mlx_lm_logits(path), rtol=1e-4, atol=1e-4)


def test_mistral_style_config_with_biases_and_tied_embeddings(tmp_path):
    path = write_tiny_llama(tmp_path / "m", model_type="mistral", tie_word_embeddings=True,
                            rope_theta=1e6, rope_scaling={"type": "linear", "factor": 2.0})
    model, _ = load_model(path)
    assert not hasattr(model, "lm_head")
    np.testing.assert_allclose(np.array(model(IDS)), mlx_lm_logits(path), rtol=1e-4, atol=1e-4)


def test_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    path = write_tiny_llama(tmp_path / "m", rope_scaling=scaling)
    model, _ = load_model(path)
    np.testing.assert_allclose(np.array(model(IDS)), mlx_lm_logits(path), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    path = write_tiny_llama(tmp_path / "m", torch_dtype=dtype)
    model, _ = load_model(path, dtype=dtype)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == getattr(mx, dtype)
    ref = mlx_lm_logits(path)
    ours = np.array(model(IDS).astype(mx.float32))
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_quantized_weights_kept_or_dequantized(tmp_path):
    src = write_tiny_llama(tmp_path / "src")
    path = write_quantized(src, tmp_path / "q")
    ref = mlx_lm_logits(path)
    kept, _ = load_model(path, keep_quantized=True)
    assert isinstance(kept.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    assert kept.model.layers[0].mlp.down_proj.bits == 8
    dense, _ = load_model(path, cpu_matmul="float32")
    # Dense again: the shared Linear layer, which has a CPU kernel.
    assert type(dense.model.layers[1].self_attn.q_proj) is Linear
    if "lm_head" in dense:
        assert type(dense.lm_head) is Linear
    assert dense.model.layers[1].self_attn.q_proj.weight.dtype == mx.float32
    for model in (kept, dense):
        np.testing.assert_allclose(np.array(model(IDS)), ref, rtol=1e-3, atol=1e-3)
    # The CPU default where the integer kernel builds: codes kept, int16 activations.
    default, _ = load_model(path)
    if int8_matmul.load() is not None:
        layer = default.model.layers[1].self_attn.q_proj
        assert isinstance(layer, Int8Linear) and layer.packed.wide
        np.testing.assert_allclose(np.array(default(IDS)), ref, rtol=2e-3, atol=2e-3)


# -- bad input: one line on stderr, exit code 2, no traceback --------------

def run_cli(args, capsys):
    code = main(["generate", "--max-tokens", "2", *args])
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.startswith("conveyor: error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_path(tmp_path, capsys):
    assert_one_line_error(*run_cli(["--model", str(tmp_path / "nope")], capsys), "not found")


def test_malformed_config(tmp_path, capsys):
    path = write_tiny_llama(tmp_path / "m")
    (path / "config.json").write_text("{not json")
    assert_one_line_error(*run_cli(["--model", str(path)], capsys), "malformed", "config.json")


def test_unknown_model_type_lists_supported(tmp_path, capsys):
    path = write_tiny_llama(tmp_path / "m", model_type="gpt9")
    assert_one_line_error(*run_cli(["--model", str(path)], capsys), "gpt9", "llama", "bert")


def test_truncated_safetensors(tmp_path, capsys):
    path = write_tiny_llama(tmp_path / "m")
    file = next(path.glob("*.safetensors"))
    file.write_bytes(file.read_bytes()[:5000])
    assert_one_line_error(*run_cli(["--model", str(path)], capsys), file.name)


def test_weights_not_matching_config(tmp_path, capsys):
    path = write_tiny_llama(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(*run_cli(["--model", str(path)], capsys), "do not match")


def test_unsupported_gguf_tensor_type(tmp_path, capsys, monkeypatch):
    from test_gguf_import import write_gguf

    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "k.gguf"
    write_gguf(src, {"general.architecture": "llama"},
               {"token_embd.weight": ("Q2_K", (8, 256))})
    assert_one_line_error(*run_cli(["--model", str(src)], capsys), "Q2_K", "k.gguf",
                          "supported:")


def test_repo_id_not_cached_names_the_repo(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="someorg/somemodel"):
        resolve_model_path("someorg/somemodel")


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "generate", "--model",
                           str(tmp_path / "missing")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("conveyor: error:") and "Traceback" not in done.stderr
