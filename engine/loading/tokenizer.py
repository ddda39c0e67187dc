"""Tokenizer: `tokenizers` underneath, Hugging Face folder conventions on top.

`Tokenizer.from_dir` reads tokenizer.json (the fast tokenizer), tokenizer_config.json
(special tokens, add_bos_token, chat template) and generation_config.json /
config.json (end-of-sequence ids). `IncrementalDetokenizer` turns a stream of
generated ids into text deltas, one request at a time.
"""

from __future__ import annotations

import codecs
import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import ConveyorError, ModelLoadError

REPLACEMENT = "\ufffd"


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


class Tokenizer:
    """A model's tokenizer: encode, decode, special ids and chat template."""

    def __init__(self, backend, config: dict | None = None,
                 eos_token_ids: Iterable[int] = (), bos_token_id: int | None = None):
        self._tok = backend
        self.config = dict(config or {})
        self.chat_template: str | None = self._pick_template(self.config.get("chat_template"))
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.unk_token = _token_content(self.config.get("unk_token"))
        if bos_token_id is None and self.bos_token is not None:
            bos_token_id = self._tok.token_to_id(self.bos_token)
        self.bos_token_id: int | None = bos_token_id
        if self.bos_token is None and bos_token_id is not None:
            self.bos_token = self._tok.id_to_token(bos_token_id)
        eos = set(eos_token_ids)
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: set[int] = eos
        if self.eos_token is None and eos:
            self.eos_token = self._tok.id_to_token(min(eos))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        max_len = self.config.get("model_max_length")
        # transformers writes a huge sentinel when a checkpoint sets no limit
        self.model_max_length: int | None = (
            int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None)
        self._special_ids = self._find_special_ids()
        self._byte_table: list[bytes] | None = None
        self._template_cache: tuple[str, Any] | None = None

    # -- construction -----------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a Hugging Face-layout folder (tokenizer.json required)."""
        from tokenizers import Tokenizer as Backend

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exception
            raise ModelLoadError(f"cannot read {tok_file}: {exc}") from None
        # Some tokenizer.json files carry fixed padding/truncation (for training);
        # transformers turns both off unless asked, and so do we.
        backend.no_padding()
        backend.no_truncation()
        config = _read_json(path / "tokenizer_config.json")
        if "chat_template" not in config:
            # Newer checkpoints keep the template in its own file.
            jinja = path / "chat_template.jinja"
            if jinja.exists():
                config["chat_template"] = jinja.read_text(encoding="utf-8")
            else:
                ct = _read_json(path / "chat_template.json").get("chat_template")
                if ct:
                    config["chat_template"] = ct
        gen = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        eos = _as_id_list(gen.get("eos_token_id")) + _as_id_list(model_cfg.get("eos_token_id"))
        bos = gen.get("bos_token_id", model_cfg.get("bos_token_id"))
        if _token_content(config.get("bos_token")) is not None:
            bos = None  # the tokenizer's own bos_token wins (looked up in __init__)
        return cls(backend, config, eos_token_ids=eos,
                   bos_token_id=bos if isinstance(bos, int) else None)

    @staticmethod
    def _pick_template(value: Any) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            return named.get("default") or next(iter(named.values()), None)
        return None

    def _find_special_ids(self) -> set[int]:
        ids = set()
        for tok_id, added in self._tok.get_added_tokens_decoder().items():
            if added.special:
                ids.add(tok_id)
        return ids

    # -- basic API -----------------------------------------------------------

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> set[int]:
        return set(self._special_ids)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With add_special_tokens, tokenizer.json's
        post-processor runs and BOS is put first when add_bos_token says so."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                and (not ids or ids[0] != self.bos_token_id)):
            ids = [self.bos_token_id, *ids]
        return ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True
                     ) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        out = []
        for enc in encs:
            ids = enc.ids
            if (add_special_tokens and self.add_bos_token and self.bos_token_id is not None
                    and (not ids or ids[0] != self.bos_token_id)):
                ids = [self.bos_token_id, *ids]
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat template ---------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render `messages` with the model's Jinja chat template (as transformers
        does: sandboxed, trim_blocks + lstrip_blocks, raise_exception, tojson,
        strftime_now). With tokenize=True, return the ids of the rendered text
        (no special tokens added: the template writes them itself)."""
        if not self.chat_template:
            raise ConveyorError("this model has no chat template; send a plain prompt instead")
        template = self._compiled_template()
        context = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
            **kwargs,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
        }
        from jinja2 import TemplateError

        try:
            text = template.render(**context)
        except TemplateError as exc:
            raise ConveyorError(f"chat template failed: {exc}") from None
        if tokenize:
            return self.encode(text, add_special_tokens=False)
        return text

    def _compiled_template(self):
        if self._template_cache and self._template_cache[0] == self.chat_template:
            return self._template_cache[1]
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        _GenerationTag = _generation_tag_class()

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _GenerationTag])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            compiled = env.from_string(self.chat_template)
        except TemplateError as exc:
            raise ConveyorError(f"the model's chat template does not parse: {exc}") from None
        self._template_cache = (self.chat_template, compiled)
        return compiled

    # -- byte-level view (for incremental detokenization) ---------------------

    def byte_table(self) -> list[bytes] | None:
        """For byte-level BPE tokenizers (ByteLevel decoder): the bytes each id
        decodes to, as `tokenizers` computes them; None for other decoders."""
        if self._byte_table is None:
            decoder = json.loads(self._tok.to_str()).get("decoder") or {}
            if decoder.get("type") == "Sequence":
                steps = decoder.get("decoders") or []
                decoder = steps[0] if len(steps) == 1 else {}
            if decoder.get("type") != "ByteLevel":
                self._byte_table = []
                return None
            char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
            table = []
            for i in range(self.vocab_size):
                tok = self._tok.id_to_token(i)
                if tok is None:
                    table.append(b"")
                elif all(c in char_to_byte for c in tok):
                    table.append(bytes(char_to_byte[c] for c in tok))
                else:  # `tokenizers` keeps such a token's own UTF-8 bytes
                    table.append(tok.encode("utf-8"))
            self._byte_table = table
        return self._byte_table or None


@functools.cache
def _generation_tag_class():
    """A Jinja extension for `{% generation %}...{% endgeneration %}` (used by some
    templates to mark assistant text for training masks): renders its body as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class IncrementalDetokenizer:
    """Text deltas for one request's generated ids.

    `add(id)` returns the text that id completes; bytes of a character not yet
    finished are held back, so a delta never ends in a broken UTF-8 sequence.
    `flush()` returns what is still held back once the request is done. The
    deltas concatenated equal `tokenizer.decode(ids, skip_special_tokens)`.

    Byte-level BPE tokenizers go through an exact byte path: each id's bytes
    feed an incremental UTF-8 decoder (O(1) per token). Other decoders
    (SentencePiece-style) decode a small window of recent tokens, as vLLM does
    with its prefix/read offsets: the text of ids[prefix:read] is compared with
    that of ids[prefix:], and the difference is emitted once it no longer ends
    in U+FFFD. `prompt_ids` (optional) give that window its left context, so a
    leading space of the first generated token is kept. That path is exact for
    ids that decode to valid UTF-8; on invalid bytes it gives up holding back
    after MAX_HELD_TOKENS tokens (best effort, bounded work).
    """

    # A window still ending in U+FFFD after this many tokens is invalid UTF-8,
    # not an unfinished character: emit it rather than let the window grow.
    MAX_HELD_TOKENS = 8

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False,
                 prompt_ids: Sequence[int] = (), byte_path: bool | None = None):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._skip_ids = tokenizer.special_token_ids if skip_special_tokens else set()
        self._pieces: list[str] = []
        self._n_tokens = 0
        table = tokenizer.byte_table() if byte_path is not False else None
        if byte_path and table is None:
            raise ValueError("byte path requested for a tokenizer without a ByteLevel decoder")
        self._table = table
        if table is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            context = [i for i in prompt_ids[-4:]] if prompt_ids else []
            self._ids: list[int] = context
            self._prefix = 0
            self._read = len(context)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def num_tokens(self) -> int:
        return self._n_tokens

    def add(self, token_id: int) -> str:
        """Feed one generated id; return the new text (possibly empty)."""
        self._n_tokens += 1
        if self._table is not None:
            if token_id in self._skip_ids or not 0 <= token_id < len(self._table):
                return ""
            delta = self._utf8.decode(self._table[token_id])
        else:
            self._ids.append(token_id)
            delta = self._window_delta(final=False)
        if delta:
            self._pieces.append(delta)
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Return any held-back text (call once the sequence is finished)."""
        if self._table is not None:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._window_delta(final=True)
        if delta:
            self._pieces.append(delta)
        return delta

    def _window_delta(self, final: bool) -> str:
        ids, prefix, read = self._ids, self._prefix, self._read
        if read >= len(ids):
            return ""
        decode = self._tokenizer.decode
        prefix_text = decode(ids[prefix:read], skip_special_tokens=self._skip)
        new_text = decode(ids[prefix:], skip_special_tokens=self._skip)
        held = len(ids) - read
        if not final and new_text.endswith(REPLACEMENT) and held < self.MAX_HELD_TOKENS:
            return ""
        if not final and len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = read, len(ids)
        # Keep the id list short: only the current window matters from now on.
        if self._prefix > 64:
            del ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta
