"""Read documents and generations from JSONL, JSONL.gz, JSONL.zst and Parquet files.

Every row is validated on the way in. A bad row (invalid JSON or UTF-8, missing / empty /
non-string text, bad id, duplicate id) raises :class:`BadRowError`, whose message is one line
``FILE:LINE: problem (fix: ...)``; with ``skip_bad_rows=True`` it is skipped and counted in the
caller's ``counts`` dict instead, so the token store manifest can record what was dropped.

Two row shapes are generations (:func:`iter_generations`):

- generation rows (docs/data-ingest.md): ``source_id``, ``task``, ``gen_index``, ``text`` plus task fields;
- the released MAGACorpus schema: ``meta.docid`` + ``meta.chunk_id`` form the source id,
  ``content_split`` is the text, ``meta.genre`` / ``meta.audience`` are kept, and ``gen_index``
  counts the rows of one source in input order (inputs are read in sorted order, so this is
  deterministic). ``meta.raw_text`` (the source text) is not copied into the fields.

The same MAGACorpus rows read as *documents* (:func:`iter_documents`, the default text/id fields)
give the real corpus the generations were made from: id ``docid#chunk_id``, text
``meta.raw_text``, one document per chunk (the rows of its other reformulations repeat the same
text and are folded into it, counted as ``maga_rows_folded``; a different text under the same id
is a duplicate-id error). So ``data.real`` and ``data.synthetic`` can both name the released files.
"""

from __future__ import annotations

import gzip
import io
import json
import json.scanner
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from megadoc_pl.utils import content_id, get_field

PathLike = Union[str, os.PathLike]

# JSON-lines flavours (dolma names its JSONL shards *.json.gz, so .json* counts as JSONL too).
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES

MAGA_TASK = "maga"
REAL_TASK = "real"  # the task recorded for real documents in a token store


class BadRowError(ValueError):
    """A bad input row; ``str(e)`` is one line ``FILE:LINE: problem (fix: ...)``."""

    def __init__(self, path: PathLike, line: int, kind: str, problem: str, fix: str):
        self.path, self.line, self.kind, self.problem, self.fix = str(path), line, kind, problem, fix
        super().__init__(f"{path}:{line}: {problem} (fix: {fix})")

    def __reduce__(self):  # picklable across worker processes despite the custom signature
        return (BadRowError, (self.path, self.line, self.kind, self.problem, self.fix))


@dataclass
class Document:
    """One real document."""

    id: str  # from the id field, else utils.content_id(text)
    text: str
    meta: dict  # the rest of the row (kept for provenance)
    path: str  # file it came from
    line: int  # 1-based line (JSONL) or row number (Parquet)
    folds_repeats: bool = False  # a MAGACorpus chunk: later rows with this id and text are folded into it


@dataclass
class Generation:
    """One synthetic text (a generation row, or a MAGACorpus row)."""

    source_id: str
    task: str
    gen_index: int
    text: str
    fields: dict = field(default_factory=dict)  # style, split_index, genre, audience, judge_score, model, ...
    path: str = ""
    line: int = 0


# --------------------------------------------------------------------------------------------
# Files


def _suffix_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    for suf in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return None


# Bookkeeping files that tools write beside their data (the synthesis runner's stats.json, a
# store's manifest, a split file); inside a directory they are not input rows.
METADATA_NAMES = frozenset({"stats.json", "manifest.json", "split.json"})


def expand_inputs(paths: Union[PathLike, Iterable[PathLike]]) -> list[Path]:
    """Files named by ``paths``; a directory expands to its supported files (recursive, sorted).

    Hidden files and folders (names starting with '.', e.g. partial writes) and bookkeeping files
    (METADATA_NAMES) are ignored inside directories. A missing path, an unsupported file or an empty directory is a one-line error.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and _suffix_of(f)
                and f.name not in METADATA_NAMES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise ValueError(
                    f"{p}: directory has no input files (fix: put {', '.join(SUPPORTED_SUFFIXES)} files in it)"
                )
            files.extend(found)
        elif p.is_file():
            if _suffix_of(p) is None:
                raise ValueError(
                    f"{p}: unsupported file type (fix: use one of {', '.join(SUPPORTED_SUFFIXES)})"
                )
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory (fix: check the input path)")
    if not files:
        raise ValueError("no input files given (fix: pass at least one file or directory)")
    seen: dict[Path, Path] = {}
    for f in files:
        key = f.resolve()
        if key in seen:
            raise ValueError(f"{f}: input file given more than once (also as {seen[key]}) (fix: pass each file or directory once)")
        seen[key] = f
    return files


def _open_binary(path: Path) -> io.BufferedIOBase:
    suf = _suffix_of(path) or ""
    if suf.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if suf.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
    return open(path, "rb")


# A raw row is (line, row) on success or (line, BadRowError) when the row itself is unreadable.
RawRow = tuple[int, Union[dict, BadRowError]]


def _read_error(path: Path, e: BaseException) -> ValueError:
    if isinstance(e, (OSError, EOFError)):  # truncated gzip, unreadable file
        return ValueError(f"{path}: cannot read the file ({e}) (fix: check that it is a complete, valid file)")
    return ValueError(f"{path}: cannot decompress ({e}) (fix: check that it is a complete .zst file)")


def block_lines(first: int, block: bytes) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of the non-blank lines of a block whose first line is ``first``."""
    for k, raw in enumerate(block.split(b"\n")):
        if raw.strip():  # blank lines (e.g. a trailing newline) are not rows
            yield first + k, raw


# json.loads(s) is this scanner at index 0 plus checks for leading and trailing whitespace: calling
# it directly saves ~1 us of Python per row (block_rows).
_SCAN_JSON = json.scanner.make_scanner(json.JSONDecoder())
_BLANK = " \t\n\r\x0b\x0c"  # what bytes.strip() removes, as str
# orjson parses a row in ~0.8 us (the stdlib ~1.7 us). Where they differ it fails, so the row
# goes to json (NaN, Infinity, out-of-range floats, lone surrogate escapes), except for integers
# beyond 64 bits, which it turns into floats: a block with a run of 19 digits is left to json
# (found by mapping every digit to 0: ~4x faster than a regular expression).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")


def orjson_loads(block: bytes) -> Optional[Callable[[bytes], Any]]:
    """orjson.loads where it answers as json.loads would on every line of ``block``, or None (no
    orjson installed, or a run of 19 digits in the block)."""
    try:
        import orjson
    except ImportError:
        return None
    return None if b"0" * 19 in block.translate(_DIGITS_TO_ZERO) else orjson.loads


def block_rows(first: int, block: bytes, path: PathLike) -> Iterator[tuple[int, Union[dict, BadRowError]]]:
    """(line number, row dict or BadRowError) of the non-blank lines of a block whose first line is
    ``first``: the same as ``decode_line`` over ``block_lines``, faster. Each line goes to orjson
    (or the stdlib's JSON scanner, on a block decoded once); a line that does not come back as an
    object (bad JSON, not an object, a case the fast parser leaves to json) goes through
    ``decode_line`` for its exact answer."""
    loads = orjson_loads(block)
    if loads is not None:
        for k, raw in enumerate(block.split(b"\n")):
            try:
                row = loads(raw)
            except ValueError:
                row = None
            if type(row) is dict:
                yield first + k, row
            elif raw.strip():
                yield first + k, decode_line(raw, path, first + k)
        return
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        for line, raw in block_lines(first, block):
            yield line, decode_line(raw, path, line)
        return
    scan = _SCAN_JSON
    for k, s in enumerate(text.split("\n")):
        try:
            row, end = scan(s, 0)
        except (StopIteration, ValueError):
            row, end = None, -1
        if end == len(s) and type(row) is dict:
            yield first + k, row
        elif s.strip(_BLANK):
            yield first + k, decode_line(s.encode("utf-8"), path, first + k)


def jsonl_blocks(path: PathLike, block_bytes: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """A JSONL(.gz/.zst) file as blocks of whole lines of about ``block_bytes`` (a longer line is
    one block of its own): (1-based number of the block's first line, bytes). Read failures are a
    one-line ValueError naming the file."""
    p = Path(path)
    try:
        with _open_binary(p) as f:
            line, parts = 1, []
            while True:
                data = f.read(block_bytes)
                if not data:
                    break
                cut = data.rfind(b"\n") + 1
                if not cut:  # inside a long line: keep reading
                    parts.append(data)
                    continue
                block = b"".join(parts) + data[:cut] if parts else data[:cut]
                parts = [data[cut:]] if cut < len(data) else []
                yield line, block
                line += block.count(b"\n")
            if parts:
                yield line, b"".join(parts)
    except Exception as e:
        # zstandard raises its own ZstdError; every read failure becomes one line naming the file
        if isinstance(e, (OSError, EOFError)) or type(e).__name__ == "ZstdError":
            raise _read_error(p, e) from None
        raise


def decode_line(raw: bytes, path: PathLike, line: int) -> Union[dict, BadRowError]:
    """One JSONL line -> row dict, or the BadRowError saying why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRowError(path, line, "invalid_utf8", f"invalid UTF-8 at byte {e.start} of the line",
                           "re-encode the file as UTF-8 or pass --skip-bad-rows")
    try:
        row = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        return BadRowError(path, line, "invalid_json", f"invalid JSON at column {e.colno} ({e.msg})",
                           "write one JSON object per line or pass --skip-bad-rows")
    if not isinstance(row, dict):
        return BadRowError(path, line, "not_an_object", f"row is a JSON {type(row).__name__}, not an object",
                           "write one JSON object per line or pass --skip-bad-rows")
    return row


def open_parquet(path: PathLike):  # -> pyarrow.parquet.ParquetFile
    """Open a Parquet file; a file pyarrow cannot read is a one-line ValueError naming it."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
        raise ValueError(f"{path}: cannot read as Parquet ({e}) (fix: check that it is a valid Parquet file)") from None


def parquet_rows(path: PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict) of every row of a Parquet file."""
    pf = open_parquet(path)
    first = 1
    for g in range(pf.num_row_groups):
        for row in pf.read_row_group(g).to_pylist():
            yield first, row
            first += 1


def is_parquet(path: PathLike) -> bool:
    return _suffix_of(Path(path)) in PARQUET_SUFFIXES


def iter_rows(path: PathLike) -> Iterator[RawRow]:
    """(line, row dict or BadRowError) for every row of one file, in file order."""
    if is_parquet(path):
        yield from parquet_rows(path)
        return
    for first, block in jsonl_blocks(path):
        yield from block_rows(first, block, path)


# --------------------------------------------------------------------------------------------
# Row -> record (pure: the token store runs these in worker processes)


def _check_text(value: Any, path: PathLike, line: int, name: str, present: bool) -> Union[str, BadRowError]:
    skip_hint = "or pass --skip-bad-rows"
    if not present or value is None:
        return BadRowError(path, line, "missing_text", f"no text field '{name}'",
                           f"set the text field (--text-field / data.text_field) {skip_hint}")
    if not isinstance(value, str):
        return BadRowError(path, line, "non_string_text", f"text field '{name}' is a {type(value).__name__}, not a string",
                           f"store the text as a string {skip_hint}")
    if not value.strip():
        return BadRowError(path, line, "empty_text", f"text field '{name}' is empty",
                           f"remove the row {skip_hint}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \\udXXX escapes
        return BadRowError(path, line, "invalid_utf8", f"text field '{name}' is not valid Unicode (lone surrogate escape)",
                           f"fix the text encoding {skip_hint}")
    return value


def _lookup(row: dict, dotted: str) -> tuple[bool, Any]:
    try:
        return True, get_field(row, dotted)
    except KeyError:
        return False, None


def _without(row: dict, dotted: str) -> dict:
    """A shallow copy of ``row`` without the (possibly nested) key ``dotted``."""
    head, _, rest = dotted.partition(".")
    if head not in row:
        return row
    out = dict(row)
    if rest:
        if isinstance(out[head], dict):
            out[head] = _without(out[head], rest)
    else:
        del out[head]
    return out


def _as_id(value: Any) -> Optional[str]:
    """An id as a string; ints are accepted (str), anything else is not an id."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_document(row: Union[dict, BadRowError], path: PathLike, line: int, text_field: str = "text",
                   id_field: str = "id") -> Union[Document, BadRowError]:
    """A row -> Document (id from ``id_field`` or the content), or why it is bad (not duplicates)."""
    if isinstance(row, BadRowError):
        return row
    if is_maga_row(row) and text_field in ("text", "meta.raw_text") and id_field not in row:
        return _document_from_maga_row(row, path, line)
    present, value = _lookup(row, text_field)
    text = _check_text(value, path, line, text_field, present)
    if isinstance(text, BadRowError):
        return text
    has_id, raw_id = _lookup(row, id_field)
    if has_id and raw_id is not None:
        doc_id = _as_id(raw_id)
        if not doc_id:
            what = "empty" if raw_id == "" else f"a {type(raw_id).__name__}"
            return BadRowError(path, line, "bad_id", f"id field '{id_field}' is {what}, not a string or integer",
                               "give the row a string id, drop the field to derive one from the text, or pass --skip-bad-rows")
    else:
        doc_id = content_id(text)
    meta = _without(_without(row, text_field), id_field) if has_id else _without(row, text_field)
    return Document(id=doc_id, text=text, meta=meta, path=str(path), line=line)


def _document_from_maga_row(row: dict, path: PathLike, line: int) -> Union[Document, BadRowError]:
    """The source chunk of a MAGACorpus row: id ``docid#chunk_id``, text ``meta.raw_text``."""
    meta = row["meta"]
    text = _check_text(meta.get("raw_text"), path, line, "meta.raw_text", "raw_text" in meta)
    if isinstance(text, BadRowError):
        return text
    docid, chunk_id = _as_id(meta.get("docid")), _as_id(meta.get("chunk_id"))
    if not docid or chunk_id is None:
        return BadRowError(path, line, "bad_field", f"meta.docid / meta.chunk_id are {meta.get('docid')!r} / "
                           f"{meta.get('chunk_id')!r}, not strings", "check the MAGACorpus row or pass --skip-bad-rows")
    kept = {k: v for k, v in meta.items() if k in ("docid", "chunk_id", "genre", "audience")}
    return Document(f"{docid}#{chunk_id}", text, kept, str(path), line, folds_repeats=True)


_GEN_REQUIRED = ("source_id", "task", "gen_index", "text")
UNASSIGNED = -1  # gen_index of a MAGACorpus row until RowChecker numbers it within its source


def is_maga_row(row: dict) -> bool:
    """True for a released-MAGACorpus row (``content_split`` + ``meta.docid``)."""
    meta = row.get("meta")
    return "content_split" in row and isinstance(meta, dict) and "docid" in meta


def parse_generation(row: Union[dict, BadRowError], path: PathLike, line: int) -> Union[Generation, BadRowError]:
    """A generation row or a MAGACorpus row -> Generation (MAGA rows get gen_index UNASSIGNED)."""
    if isinstance(row, BadRowError):
        return row
    if is_maga_row(row):
        return _generation_from_maga_row(row, path, line)
    if "text" in row or "source_id" in row:
        return _generation_from_spec_row(row, path, line)
    return BadRowError(
        path, line, "missing_text",
        "row is neither a generation (source_id, task, gen_index, text) nor a MAGACorpus row (meta.docid, content_split)",
        "write generation rows (docs/data-ingest.md) or pass --skip-bad-rows",
    )


def _generation_from_spec_row(row: dict, path: PathLike, line: int) -> Union[Generation, BadRowError]:
    fix = "write generation rows (source_id, task, gen_index, text) or pass --skip-bad-rows"
    present, value = _lookup(row, "text")
    text = _check_text(value, path, line, "text", present)
    if isinstance(text, BadRowError):
        return text
    source_id = _as_id(row.get("source_id"))
    if not source_id:
        return BadRowError(path, line, "bad_field", f"source_id is {row.get('source_id')!r}, not a non-empty string", fix)
    task = row.get("task")
    if not isinstance(task, str) or not task:
        return BadRowError(path, line, "bad_field", f"task is {task!r}, not a non-empty string", fix)
    gen_index = row.get("gen_index")
    if not isinstance(gen_index, int) or isinstance(gen_index, bool) or gen_index < 0:
        return BadRowError(path, line, "bad_field", f"gen_index is {gen_index!r}, not an integer >= 0", fix)
    fields = {k: v for k, v in row.items() if k not in _GEN_REQUIRED}
    return Generation(source_id, task, gen_index, text, fields, str(path), line)


def _generation_from_maga_row(row: dict, path: PathLike, line: int) -> Union[Generation, BadRowError]:
    fix = "check the MAGACorpus row (meta.docid, meta.chunk_id, content_split) or pass --skip-bad-rows"
    text = _check_text(row.get("content_split"), path, line, "content_split", True)
    if isinstance(text, BadRowError):
        return text
    meta = row["meta"]
    docid, chunk_id = _as_id(meta.get("docid")), _as_id(meta.get("chunk_id"))
    if not docid:
        return BadRowError(path, line, "bad_field", f"meta.docid is {meta.get('docid')!r}, not a non-empty string", fix)
    if chunk_id is None:
        return BadRowError(path, line, "bad_field", f"meta.chunk_id is {meta.get('chunk_id')!r}, not a string", fix)
    fields = {k: v for k, v in meta.items() if k != "raw_text"}
    fields.update({k: v for k, v in row.items() if k not in ("meta", "content_split")})
    return Generation(f"{docid}#{chunk_id}", MAGA_TASK, UNASSIGNED, text, fields, str(path), line)


# --------------------------------------------------------------------------------------------
# In-order checks: duplicates, MAGA numbering, counting


class RowChecker:
    """The stateful part of reading, applied to parsed rows in input order.

    Raises the first BadRowError, or (``skip_bad_rows``) counts it into ``counts``:
    ``{"rows": good, "bad_rows": n, "bad_rows_by_kind": {kind: n}}``. Rejects duplicate ids
    (documents) / duplicate (source_id, task, gen_index) (generations), keeping the first, and
    numbers MAGACorpus rows within their source in input order.
    """

    def __init__(self, skip_bad_rows: bool = False, counts: Optional[dict] = None):
        self.counts = counts if counts is not None else {}
        self.counts.setdefault("rows", 0)
        self.counts.setdefault("bad_rows", 0)
        self.counts.setdefault("bad_rows_by_kind", {})
        self.skip = skip_bad_rows
        self.seen: dict[Any, tuple[str, int]] = {}
        self.maga_next: dict[str, int] = {}
        self.folded_text: dict[str, int] = {}  # MAGACorpus chunk id -> hash of its text

    def bad(self, err: BadRowError) -> None:
        if not self.skip:
            raise err
        self.counts["bad_rows"] += 1
        kinds = self.counts["bad_rows_by_kind"]
        kinds[err.kind] = kinds.get(err.kind, 0) + 1

    def accept(self, rec: Union[Document, Generation, BadRowError]) -> bool:
        """True if ``rec`` is a good, new record (MAGA gen_index filled in); else raise or count."""
        if isinstance(rec, BadRowError):
            self.bad(rec)
            return False
        if isinstance(rec, Document):
            key: Any = rec.id
        else:
            if rec.gen_index == UNASSIGNED:
                rec.gen_index = self.maga_next.get(rec.source_id, 0)
                self.maga_next[rec.source_id] = rec.gen_index + 1
            key = (rec.source_id, rec.task, rec.gen_index)
        first = self.seen.get(key)
        if first is not None:
            if getattr(rec, "folds_repeats", False) and self.folded_text.get(rec.id) == hash(rec.text):
                self.counts["maga_rows_folded"] = self.counts.get("maga_rows_folded", 0) + 1
                return False
            self.bad(duplicate_error(rec, first))
            return False
        self.seen[key] = (rec.path, rec.line)
        if getattr(rec, "folds_repeats", False):
            self.folded_text[rec.id] = hash(rec.text)
        self.counts["rows"] += 1
        return True


def duplicate_error(rec: Union[Document, Generation], first: tuple[str, int]) -> BadRowError:
    where = f"(first at {first[0]}:{first[1]})"
    if isinstance(rec, Document):
        return BadRowError(rec.path, rec.line, "duplicate_id", f"duplicate id {rec.id!r} {where}",
                           "remove the duplicate row, make ids unique, or pass --skip-bad-rows")
    return BadRowError(
        rec.path, rec.line, "duplicate_id",
        f"duplicate generation (source_id={rec.source_id!r}, task={rec.task!r}, gen_index={rec.gen_index}) {where}",
        "remove the duplicate row or pass --skip-bad-rows",
    )


# --------------------------------------------------------------------------------------------
# Public iterators


def iter_documents(
    paths: Union[PathLike, Iterable[PathLike]],
    text_field: str = "text",
    id_field: str = "id",
    skip_bad_rows: bool = False,
    counts: Optional[dict] = None,
) -> Iterator[Document]:
    """Real documents from files or directories, in (sorted) file order, validated row by row.

    ``counts`` (optional dict) receives ``rows`` (good rows), ``bad_rows`` and
    ``bad_rows_by_kind``. Ids must be unique across all inputs; a row without an id gets
    ``utils.content_id(text)``, so two identical texts without ids are duplicates.
    """
    checker = RowChecker(skip_bad_rows, counts)
    for path in expand_inputs(paths):
        for line, row in iter_rows(path):
            doc = parse_document(row, path, line, text_field, id_field)
            if checker.accept(doc):
                yield doc  # type: ignore[misc]


def iter_generations(
    paths: Union[PathLike, Iterable[PathLike]],
    skip_bad_rows: bool = False,
    counts: Optional[dict] = None,
) -> Iterator[Generation]:
    """Generations (generation rows or MAGACorpus rows, mixed freely) in (sorted) file order.

    ``(source_id, task, gen_index)`` must be unique across all inputs; for MAGACorpus rows the
    gen_index is the row's rank among the rows of its source (``docid#chunk_id``) in input order.
    """
    checker = RowChecker(skip_bad_rows, counts)
    for path in expand_inputs(paths):
        for line, row in iter_rows(path):
            gen = parse_generation(row, path, line)
            if checker.accept(gen):
                yield gen  # type: ignore[misc]
