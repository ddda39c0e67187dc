"""A small reference GGUF quantizer: float weights to GGML blocks, and
llama.cpp's Q4_K_M type mix, to make K-quant GGUF files offline (no llama.cpp
here) for the bench and the tests.

The legacy types come from the `gguf` package's quantizer; Q4_K, Q5_K and
Q6_K (which it only dequantizes) are made here with plain min/max rounding,
not llama.cpp's error-minimising search: the files are valid GGML blocks of
the same layout and size, a little less accurate than llama.cpp's.

    python -m bench.gguf_quantize SRC.gguf DST.gguf [--mix Q4_K_M|Q4_1|...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

K = 256  # values per K-quant super-block


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _k_scales_pack(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per block -> GGML's 12 bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return out


def _k_affine(x: np.ndarray, levels: int):
    """Q4_K/Q5_K: per 32-value sub-block a scale and a non-negative min, both
    6-bit multiples of the block's d and dmin. Returns (d, dmin, sc, m, q)."""
    sub = x.reshape(-1, 8, 32)
    low = np.minimum(sub.min(axis=2), 0)
    scale, mins = (sub.max(axis=2) - low) / levels, -low
    d = _f16(scale.max(axis=1) / 63).astype(np.float32)
    dmin = _f16(mins.max(axis=1) / 63).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), 0, 63)
    m = np.clip(np.rint(_safe_div(mins, dmin[:, None])), 0, 63)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(_safe_div(sub + (dmin[:, None] * m)[..., None], step)), 0, levels)
    return d, dmin, sc, m, q.astype(np.uint8).reshape(-1, K)


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """256 codes -> 128 bytes: per 64 values, the first 32 low, the next high."""
    q = q.reshape(-1, 4, 2, 32) & 15
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _k_affine(x, 15)
    return np.concatenate([_f16(d)[:, None].view(np.uint8), _f16(dmin)[:, None].view(np.uint8),
                           _k_scales_pack(sc, m), _k_nibbles(q)], axis=1)


def q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _k_affine(x, 31)
    high = (q.reshape(-1, 8, 32) >> 4).astype(np.uint8)
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_f16(d)[:, None].view(np.uint8), _f16(dmin)[:, None].view(np.uint8),
                           _k_scales_pack(sc, m), qh, _k_nibbles(q)], axis=1)


def q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31
    d = _f16(scale.max(axis=1) / 127).astype(np.float32)
    sc = np.clip(np.rint(_safe_div(scale, d[:, None])), -128, 127)
    step = (d[:, None] * sc)[..., None]
    q = (np.clip(np.rint(_safe_div(sub, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)
    # Per half: low nibbles of values 0-63 | 64-127 share ql's bytes; the top
    # two bits of values 0-31, 32-63, 64-95, 96-127 share qh's bytes.
    ql = ((q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)).reshape(-1, 128)
    top = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6))
    return np.concatenate([ql, qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                           _f16(d)[:, None].view(np.uint8)], axis=1)


def quantize(x: np.ndarray, ggml_type: str) -> np.ndarray:
    """Float rows [rows, cols] -> GGML blocks, uint8 [rows, bytes per row]."""
    x = np.ascontiguousarray(x, np.float32)
    rows = x.shape[0]
    if ggml_type in ("Q4_K", "Q5_K", "Q6_K"):
        blocks = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}[ggml_type](x.reshape(-1, K))
        return blocks.reshape(rows, -1)
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(x, GGMLQuantizationType[ggml_type])


def _more_bits(i: int, n: int) -> bool:
    # llama.cpp's use_more_bits: the first and last eighth, and every third between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def q4_k_m_type(name: str, cols: int, n_layers: int, has_output: bool) -> str:
    """llama.cpp's Q4_K_M choice for a 2-D weight (dense models): Q6_K for the
    output (or a tied embedding), for attn_v and ffn_down in the layers
    `_more_bits` picks; Q4_K elsewhere; rows not a multiple of 256 fall back
    to a 32-block type (Q6_K to Q8_0 for the output)."""
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (name == "token_embd.weight" and not has_output):
        kind = "Q6_K" if cols % K == 0 else "Q8_0"
        return kind
    kind = "Q4_K"
    if (".attn_v." in name or ".ffn_down." in name) and _more_bits(layer, n_layers):
        kind = "Q6_K"
    return kind if cols % K == 0 else _FALLBACK[kind]


def requantize(src: Path, dst: Path, mix: str = "Q4_K_M") -> dict[str, int]:
    """Write `dst`: `src`'s metadata and tensors, its 2-D weights requantized
    (dequantized with the `gguf` package, then quantized to `mix`: Q4_K_M or
    one type for all). Returns how many tensors got each type."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    reader = GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    names = {t.name for t in reader.tensors}
    n_layers = reader.fields[f"{arch}.block_count"].contents()
    counts: dict[str, int] = {}
    for t in reader.tensors:
        values = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = values.reshape(shape)
        if len(shape) == 2:
            kind = q4_k_m_type(t.name, shape[1], n_layers, "output.weight" in names) \
                if mix == "Q4_K_M" else mix
        else:
            kind = "F32"
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "F32":
            writer.add_tensor(t.name, values)
        else:
            qtype = GGMLQuantizationType[kind]
            writer.add_tensor(t.name, quantize(values, kind), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--mix", default="Q4_K_M")
    args = p.parse_args()
    print(requantize(Path(args.src), Path(args.dst), args.mix))


if __name__ == "__main__":
    main()
