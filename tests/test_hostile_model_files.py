"""Hostile or broken model files fail with one clear line (issue 16, defect 7).

Each case once crashed the loader: 3 million layers allocated until the
memory cap killed the process, a zero dimension divided by zero, nested GGUF
metadata recursed, huge counts and lengths were believed. Now every one is a
ModelLoadError naming the field, raised before anything is built.
"""

import json
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from test_gguf_import import _gguf_str, tiny_llama
from tiny_models import write_quantized, write_tiny_llama

from engine.entrypoints.cli import main
from engine.errors import ModelLoadError
from engine.loading.gguf import import_gguf
from engine.loading.gguf_header import MAX_ARRAY, read_gguf_header
from engine.loading.loader import load_model


@pytest.fixture(autouse=True)
def memory_cap():
    """Each test may grow this process's address space by 2 GiB at most: a
    loader that believes a hostile file fails with MemoryError instead of
    taking the machine's memory (as 3 million layers once did)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = int(next(line.split()[1] for line in Path("/proc/self/status").read_text()
                    .splitlines() if line.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + (2 << 30), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("hostile") / "m")


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of the checkpoint `src` whose config.json has `changes`."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as exc:
        load_model(path)
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# -- config.json -------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"num_hidden_layers": 3_000_000}, "num_hidden_layers"),
    ({"num_hidden_layers": 3}, "num_hidden_layers"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"intermediate_size": -5}, "intermediate_size"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_attention_heads": 6}, "hidden_size"),                # 64 is not 6 heads
    ({"hidden_size": "64"}, "hidden_size"),
    ({"hidden_size": 64.0}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"hidden_size": 2**30, "num_attention_heads": 1, "num_key_value_heads": 1},
     "hidden_size"),                                            # too big for the files
    ({"intermediate_size": 2**31 - 1}, "intermediate_size"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling factor"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": -1.0,
                       "high_freq_factor": 4.0}}, "low_freq_factor"),
    ({"quantization": [4]}, "quantization"),
    ({"quantization": {"bits": 7, "group_size": 64}}, "bits"),
    ({"quantization": {"bits": 4, "group_size": 0}}, "group_size"),
    ({"eos_token_id": "</s>"}, "eos_token_id"),
    ({"torch_dtype": 16}, "torch_dtype"),
])
def test_bad_config_names_the_field(tiny_dir, tmp_path, changes, field):
    message = load_error(with_config(tiny_dir, tmp_path / "m", **changes))
    assert field in message and "config.json" in message, message


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    return write_quantized(tiny_dir, tmp_path_factory.mktemp("hostile-q") / "q")


DOWN = "model.layers.0.mlp.down_proj"  # write_quantized's 8-bit layer


@pytest.mark.parametrize("quantization, words", [
    ({"group_size": 128, "bits": 4, DOWN: {"group_size": 32, "bits": 8}}, "does not fit"),
    ({"group_size": 32, "bits": 8, DOWN: {"group_size": 32, "bits": 8}}, "does not fit"),
    ({"group_size": 32, "bits": 4, DOWN: {"bits": 8}}, "does not fit"),   # group 64 then
    ({"group_size": 32, "bits": 4, DOWN: 5}, "must be true, false or an object"),
    ({"group_size": 32, "bits": True}, "bits"),
    ({"group_size": 32, "bits": 4, DOWN: {"group_size": 32, "bits": 8, "mode": "x"}}, "mode"),
])
def test_quantization_that_does_not_fit_the_weights(quantized_dir, tmp_path, quantization,
                                                    words):
    message = load_error(with_config(quantized_dir, tmp_path / "m", quantization=quantization))
    assert words in message and "quantization" in message, message


def test_three_million_layers_fail_before_building(tiny_dir, tmp_path):
    message = load_error(with_config(tiny_dir, tmp_path / "m", num_hidden_layers=3_000_000))
    assert "3000000" in message and "2 numbered layers" in message, message


def test_layers_bounded_by_the_files_not_just_named_tensors(tiny_dir, tmp_path):
    """Layers that exist by name still have to fit the bytes: a config with the
    real two layers but an enormous width is refused by size."""
    message = load_error(with_config(tiny_dir, tmp_path / "m", hidden_size=1 << 20,
                                     num_attention_heads=1 << 10, num_key_value_heads=1 << 10))
    assert "bytes of weights" in message and "hold" in message, message


def test_deeply_nested_config_json(tiny_dir, tmp_path):
    path = with_config(tiny_dir, tmp_path / "m")
    (path / "config.json").unlink()
    (path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    assert "config.json" in load_error(path)


@pytest.mark.parametrize("mangle, words", [
    (lambda h: h[:8] + b"{not json" + h[17:], "malformed safetensors header"),
    (lambda h: h.replace(b'"F32"', b'"F99"', 1), "unknown dtype"),
    (lambda h: h.replace(b'[64,64]', b'[64,65]', 1), "does not take"),
    (lambda h: struct.pack("<Q", 1 << 62) + h[8:], "bad header length"),
])
def test_bad_safetensors_header(tiny_dir, tmp_path, mangle, words):
    path = with_config(tiny_dir, tmp_path / "m")
    weights = next(path.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(mangle(data))
    message = load_error(path)
    assert words in message and weights.name in message, message


def test_valid_variants_still_load(tiny_dir, tmp_path):
    """What mlx-lm configs legitimately contain passes: explicit head_dim,
    nulls for derived values, a list of eos ids, no rope_scaling."""
    path = with_config(tiny_dir, tmp_path / "m", head_dim=16, eos_token_id=[258, 257],
                       rope_scaling=None, pad_token_id=None, quantization_config=None)
    model, config = load_model(path)
    assert len(model.model.layers) == 2 and config["eos_token_id"] == [258, 257]


# -- GGUF --------------------------------------------------------------------

def gguf_error(src: Path, tmp_path: Path) -> str:
    with pytest.raises(ModelLoadError) as exc:
        import_gguf(src, tmp_path / "out")
    message = str(exc.value)
    assert "\n" not in message and str(src) in message, message
    assert not (tmp_path / "out").exists()
    return message


@pytest.mark.parametrize("overrides, field", [
    ({"llama.block_count": 3_000_000}, "llama.block_count"),
    ({"llama.attention.head_count": 0}, "llama.attention.head_count"),
    ({"llama.attention.head_count_kv": 0}, "llama.attention.head_count_kv"),
    ({"llama.attention.head_count_kv": 3}, "llama.attention.head_count_kv"),
    ({"llama.embedding_length": 0}, "llama.embedding_length"),
    ({"llama.feed_forward_length": 0}, "llama.feed_forward_length"),
    ({"llama.embedding_length": "64"}, "llama.embedding_length"),
    ({"llama.attention.layer_norm_rms_epsilon": float("inf")},
     "llama.attention.layer_norm_rms_epsilon"),
    ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": ["nospace"]}, "merge"),
    ({"general.alignment": 24}, "general.alignment"),
])
def test_bad_gguf_metadata_names_the_field(tmp_path, overrides, field):
    src = tmp_path / "bad.gguf"
    tiny_llama(src, meta_overrides=overrides)
    assert field in gguf_error(src, tmp_path)


def splice_metadata(src: Path, raw_value: bytes) -> None:
    """Add one key/value (type + value bytes given raw) to the GGUF at `src`,
    keeping the tensor data aligned (the key is padded to a multiple of 32)."""
    data = src.read_bytes()
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    key = "test.extra"
    while (8 + len(key) + len(raw_value)) % 32:
        key += "_"
    src.write_bytes(data[:16] + struct.pack("<Q", n_kv + 1) + _gguf_str(key) + raw_value
                    + data[24:])


@pytest.mark.parametrize("raw, words", [
    # an array of arrays of ... 100,000 deep
    (struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 100_000 + struct.pack("<IQi", 5, 1, 7),
     "nests arrays"),
    (struct.pack("<IIQ", 9, 5, 2**62), f"at most {MAX_ARRAY}"),
    (struct.pack("<IIQ", 9, 8, 2**24), "past the end"),           # 16M strings, no bytes
    (struct.pack("<IIQ", 9, 5, 2**24), "past the end"),
    (struct.pack("<IQ", 8, 2**62), "claims"),
    (struct.pack("<I", 77), "unknown value type 77"),
])
def test_hostile_gguf_metadata(tmp_path, raw, words):
    src = tmp_path / "bad.gguf"
    tiny_llama(src)
    splice_metadata(src, raw)
    message = gguf_error(src, tmp_path)
    assert words in message and "test.extra" in message, message


def tensor_record(data: bytes, name: str) -> int:
    """Where the record of tensor `name` continues after its name: n_dims (4
    bytes), then for this 1-D tensor its length (8), type (4) and offset (8)."""
    return data.index(_gguf_str(name)) + len(_gguf_str(name))


@pytest.mark.parametrize("patch, words", [
    (lambda d, at: d[:at] + struct.pack("<I", 9) + d[at + 4:], "9 dimensions"),
    (lambda d, at: d[:at + 4] + struct.pack("<Q", 0) + d[at + 12:], "shape"),
    (lambda d, at: d[:at + 16] + struct.pack("<Q", 2**62) + d[at + 24:], "offset"),
    (lambda d, at: d[:at + 16] + struct.pack("<Q", 32 * (len(d) // 32)) + d[at + 24:],
     "past the end of the file"),
    (lambda d, at: d[:at + 16] + struct.pack("<Q", 33) + d[at + 24:], "alignment"),
    (lambda d, at: d[:at + 4] + struct.pack("<Q", 2**40) + d[at + 12:], "past the end"),
])
def test_tensor_records_outside_the_file(tmp_path, patch, words):
    src = tmp_path / "bad.gguf"
    tiny_llama(src)
    data = src.read_bytes()
    src.write_bytes(patch(data, tensor_record(data, "output_norm.weight")))
    assert words in gguf_error(src, tmp_path)


def test_huge_counts_in_the_gguf_preamble(tmp_path):
    src = tmp_path / "bad.gguf"
    tiny_llama(src)
    data = src.read_bytes()
    for at, word in ((8, "tensors"), (16, "metadata keys")):
        src.write_bytes(data[:at] + struct.pack("<Q", 2**63) + data[at + 8:])
        assert word in gguf_error(src, tmp_path)


def test_truncated_tensor_data(tmp_path):
    src = tmp_path / "cut.gguf"
    tiny_llama(src)
    src.write_bytes(src.read_bytes()[:-100])
    assert "past the end of the file" in gguf_error(src, tmp_path)


def test_valid_tiny_gguf_header(tmp_path):
    src = tmp_path / "ok.gguf"
    tiny_llama(src)
    header = read_gguf_header(src)
    assert header.version == 3 and len(header.tensors) == 2 + 2 * 9
    assert header.tensors["token_embd.weight"].shape == (261, 64)
    assert header.tensors["blk.0.attn_q.weight"].ggml_type == "Q8_0"
    assert header.tensors["blk.0.attn_q.weight"].nbytes == 64 * 64 // 32 * 34
    assert header.metadata["llama.block_count"] == 2
    assert header.metadata["tokenizer.ggml.token_type"][:3] == [3, 3, 1]


# -- through the CLI: one line, exit 2, memory bounded -------------------------

def test_cli_three_million_layers_is_one_line_and_small(tiny_dir, tmp_path):
    path = with_config(tiny_dir, tmp_path / "m", num_hidden_layers=3_000_000)
    limit = 3 << 30  # the old loader needed far more than this and was killed

    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", "generate",
                           "--model", str(path), "--max-tokens", "1", "--prompt", "hello"],
                          capture_output=True, text=True, timeout=300, preexec_fn=cap_memory)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("conveyor: error:")]
    assert len(errors) == 1 and "num_hidden_layers" in errors[0], done.stderr


def test_cli_zero_heads_gguf(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CONVEYOR_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "zero.gguf"
    tiny_llama(src, meta_overrides={"llama.attention.head_count": 0})
    code = main(["generate", "--model", str(src), "--max-tokens", "1", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith("conveyor: error:") and "llama.attention.head_count" in err, err
