"""Sentence pooling: from token hidden states to one vector per text.

What a sentence-transformers checkpoint does after the encoder is written in
its files: modules.json lists the modules (Transformer, Pooling, Normalize) and
1_Pooling/config.json the pooling mode(s). `read_pooling` reads them; a plain
Hugging Face encoder without them gets mean pooling and no normalisation, as
sentence-transformers would give it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import msgspec
import numpy as np

from engine.errors import ModelLoadError

# sentence-transformers concatenates the enabled modes in this order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "lasttoken")
_CONFIG_KEYS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


class Pooling(msgspec.Struct, frozen=True):
    """How token states become a sentence vector."""

    modes: tuple[str, ...] = ("mean",)  # concatenated in this order
    normalize: bool = False  # L2-normalise the pooled vector


class _Module(msgspec.Struct):
    type: str
    path: str = ""


def read_pooling(model_dir: Path, *, mode: str | None = None,
                 normalize: bool | None = None) -> Pooling:
    """The pooling a model directory asks for; `mode`/`normalize` override it.

    `mode` is one of POOLING_MODES (or several joined by '+', e.g. "cls+mean").
    """
    modes: tuple[str, ...] = ("mean",)
    norm = False
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        try:
            modules = msgspec.json.decode(modules_file.read_bytes(), type=list[_Module])
        except msgspec.DecodeError as exc:
            raise ModelLoadError(f"{modules_file}: {exc}") from None
        for module in modules:
            kind = module.type.rsplit(".", 1)[-1]
            if kind == "Pooling":
                modes = _read_pooling_config(model_dir / module.path / "config.json")
            elif kind == "Normalize":
                norm = True
    if mode is not None:
        modes = parse_modes(mode)
    if normalize is not None:
        norm = normalize
    return Pooling(modes=modes, normalize=norm)


_ALIASES = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean",
            "mean_sqrt_len_tokens": "mean_sqrt_len", "last": "lasttoken",
            "last_token": "lasttoken"}


def parse_modes(spec: str) -> tuple[str, ...]:
    """"mean", "cls", "max", "lasttoken", ... or several joined by '+'."""
    modes = tuple(_ALIASES.get(m.strip().lower(), m.strip().lower()) for m in spec.split("+"))
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ModelLoadError(
            f"unknown pooling mode {unknown[0]!r}; choose from {', '.join(POOLING_MODES)}")
    return modes


def _read_pooling_config(path: Path) -> tuple[str, ...]:
    try:
        config = msgspec.json.decode(path.read_bytes(), type=dict)
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelLoadError(f"cannot read pooling config {path}: {exc}") from None
    modes = tuple(m for m in POOLING_MODES if config.get(_CONFIG_KEYS[m]))
    if not modes:
        # Newer files may name the mode instead of setting flags.
        named = config.get("pooling_mode")
        if not isinstance(named, str):
            raise ModelLoadError(f"{path}: no pooling mode enabled")
        modes = parse_modes(named)
    unsupported = [k for k in ("pooling_mode_weightedmean_tokens",) if config.get(k)]
    if unsupported:
        raise ModelLoadError(f"{path}: {unsupported[0]} is not supported")
    return modes


def pool(hidden: mx.array, attention_mask: mx.array, pooling: Pooling) -> mx.array:
    """[B, T, D] hidden states and a [B, T] 0/1 mask -> [B, D']. Padding on
    the right ("cls" reads position 0); "lasttoken" also takes left padding."""
    mask = attention_mask.astype(hidden.dtype)[..., None]  # [B, T, 1]
    count = mx.maximum(mask.sum(axis=1), 1e-9)  # [B, 1]
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            # Padding must never win the max; -1e9 as sentence-transformers uses.
            parts.append(mx.where(mask > 0, hidden, -1e9).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * mask).sum(axis=1) / count)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * mask).sum(axis=1) / mx.sqrt(count))
        elif mode == "lasttoken":
            last = _last_real(attention_mask != 0, mx)
            parts.append(mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0])
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if pooling.normalize:
        norm = mx.sqrt((out * out).sum(axis=-1, keepdims=True))
        out = out / mx.maximum(norm, 1e-12)
    return out


def pool_host(hidden: np.ndarray, attention_mask: np.ndarray, pooling: Pooling) -> np.ndarray:
    """`pool` on host arrays (the CPU fast path's output): float32 [B, D'].
    Padding positions are never read, whatever they hold."""
    keep = np.asarray(attention_mask) != 0  # [B, T]
    count = keep.sum(axis=1, dtype=np.float32)[:, None]  # [B, 1]
    summed = None
    if {"mean", "mean_sqrt_len"} & set(pooling.modes):
        # A sum over the real tokens only: padding rows may hold anything.
        summed = np.where(keep[..., None], hidden, 0.0).sum(axis=1)
    parts = []
    for mode in pooling.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(keep[..., None], hidden, -1e9).max(axis=1))
        elif mode == "mean":
            parts.append(summed / np.maximum(count, 1e-9))
        elif mode == "mean_sqrt_len":
            parts.append(summed / np.sqrt(np.maximum(count, 1e-9)))
        elif mode == "lasttoken":
            parts.append(hidden[np.arange(hidden.shape[0]), _last_real(keep, np)])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    out = out.astype(np.float32, copy=False)
    if pooling.normalize:
        norm = np.sqrt((out * out).sum(axis=-1, keepdims=True))
        out = out / np.maximum(norm, 1e-12)
    return out


def _last_real(keep, lib):
    """Index of each row's last real token, for right or left padding alike
    (a decoder's last token is the one that has seen the whole text)."""
    t = keep.shape[1]
    positions = lib.arange(1, t + 1, dtype=lib.int32)[None]
    # Highest position (1-based) holding a real token; 0 for an empty row.
    last = lib.where(keep, positions, 0).max(axis=1)
    return lib.maximum(last - 1, 0)


def pooled_dim(hidden_size: int, pooling: Pooling) -> int:
    return hidden_size * len(pooling.modes)
