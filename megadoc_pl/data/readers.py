"""Read documents and generations from JSONL, JSONL.gz, JSONL.zst and Parquet files.

Every row is validated on the way in. A bad row (invalid JSON or UTF-8, missing / empty /
non-string text, bad id, duplicate id) raises :class:`BadRowError`, whose message is one line
``FILE:LINE: problem (fix: ...)``; with ``skip_bad_rows=True`` it is skipped and counted in the
caller's ``counts`` dict instead, so the token store manifest can record what was dropped.

Two row shapes are generations (:func:`iter_generations`):

- SPEC 3.2 rows: ``source_id``, ``task``, ``gen_index``, ``text`` plus task fields;
- the released MAGACorpus schema: ``meta.docid`` + ``meta.chunk_id`` form the source id,
  ``content_split`` is the text, ``meta.genre`` / ``meta.audience`` are kept, and ``gen_index``
  counts the rows of one source in input order (inputs are read in sorted order, so this is
  deterministic). ``meta.raw_text`` (the source text) is not copied into the fields.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

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


@dataclass
class Document:
    """One real document."""

    id: str  # from the id field, else utils.content_id(text)
    text: str
    meta: dict  # the rest of the row (kept for provenance)
    path: str  # file it came from
    line: int  # 1-based line (JSONL) or row number (Parquet)


@dataclass
class Generation:
    """One synthetic text (SPEC 3.2 row, or a MAGACorpus row)."""

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


def expand_inputs(paths: Union[PathLike, Iterable[PathLike]]) -> list[Path]:
    """Files named by ``paths``; a directory expands to its supported files (recursive, sorted).

    Hidden files and folders (names starting with '.', e.g. partial writes) are ignored inside
    directories. A missing path, an unsupported file or an empty directory is a one-line error.
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


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    try:
        with _open_binary(path) as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not rows
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield line_no, BadRowError(
                        path, line_no, "invalid_utf8",
                        f"invalid UTF-8 at byte {e.start} of the line",
                        "re-encode the file as UTF-8 or pass --skip-bad-rows",
                    )
                    continue
                try:
                    row = json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    yield line_no, BadRowError(
                        path, line_no, "invalid_json", f"invalid JSON at column {e.colno} ({e.msg})",
                        "write one JSON object per line or pass --skip-bad-rows",
                    )
                    continue
                if not isinstance(row, dict):
                    yield line_no, BadRowError(
                        path, line_no, "not_an_object", f"row is a JSON {type(row).__name__}, not an object",
                        "write one JSON object per line or pass --skip-bad-rows",
                    )
                    continue
                yield line_no, row
    except (OSError, EOFError) as e:  # truncated gzip, corrupt zstd frame, unreadable file
        raise ValueError(f"{path}: cannot read the file ({e}) (fix: check that it is a complete, valid file)") from None
    except Exception as e:  # zstandard raises its own ZstdError
        if type(e).__name__ == "ZstdError":
            raise ValueError(f"{path}: cannot decompress ({e}) (fix: check that it is a complete .zst file)") from None
        raise


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError on a bad file
        raise ValueError(f"{path}: cannot read as Parquet ({e}) (fix: check that it is a valid Parquet file)") from None
    row_no = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def iter_rows(path: PathLike) -> Iterator[RawRow]:
    """(line, row dict or BadRowError) for every row of one file, in file order."""
    p = Path(path)
    if _suffix_of(p) in PARQUET_SUFFIXES:
        return _parquet_rows(p)
    return _jsonl_rows(p)


# --------------------------------------------------------------------------------------------
# Validation helpers


class _Counter:
    """Counts skipped rows into the caller's dict: {"bad_rows": n, "bad_rows_by_kind": {...}}."""

    def __init__(self, counts: Optional[dict], skip: bool):
        self.counts = counts if counts is not None else {}
        self.counts.setdefault("bad_rows", 0)
        self.counts.setdefault("bad_rows_by_kind", {})
        self.counts.setdefault("rows", 0)
        self.skip = skip

    def bad(self, err: BadRowError) -> None:
        if not self.skip:
            raise err
        self.counts["bad_rows"] += 1
        kinds = self.counts["bad_rows_by_kind"]
        kinds[err.kind] = kinds.get(err.kind, 0) + 1


def _check_text(value: Any, path: Path, line: int, name: str, present: bool) -> Union[str, BadRowError]:
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


# --------------------------------------------------------------------------------------------
# Documents


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
    counter = _Counter(counts, skip_bad_rows)
    seen: dict[str, tuple[str, int]] = {}
    for path in expand_inputs(paths):
        for line, row in iter_rows(path):
            if isinstance(row, BadRowError):
                counter.bad(row)
                continue
            present, value = _lookup(row, text_field)
            text = _check_text(value, path, line, text_field, present)
            if isinstance(text, BadRowError):
                counter.bad(text)
                continue
            has_id, raw_id = _lookup(row, id_field)
            if has_id and raw_id is not None:
                doc_id = _as_id(raw_id)
                if not doc_id:
                    what = "empty" if raw_id == "" else f"a {type(raw_id).__name__}"
                    counter.bad(BadRowError(path, line, "bad_id", f"id field '{id_field}' is {what}, not a string or integer",
                                            "give the row a string id, drop the field to derive one from the text, or pass --skip-bad-rows"))
                    continue
            else:
                doc_id = content_id(text)
            first = seen.get(doc_id)
            if first is not None:
                counter.bad(BadRowError(path, line, "duplicate_id", f"duplicate id {doc_id!r} (first at {first[0]}:{first[1]})",
                                        "remove the duplicate row, make ids unique, or pass --skip-bad-rows"))
                continue
            seen[doc_id] = (str(path), line)
            meta = _without(_without(row, text_field), id_field) if has_id else _without(row, text_field)
            counter.counts["rows"] += 1
            yield Document(id=doc_id, text=text, meta=meta, path=str(path), line=line)


# --------------------------------------------------------------------------------------------
# Generations

_GEN_REQUIRED = ("source_id", "task", "gen_index", "text")


def is_maga_row(row: dict) -> bool:
    """True for a released-MAGACorpus row (``content_split`` + ``meta.docid``)."""
    meta = row.get("meta")
    return "content_split" in row and isinstance(meta, dict) and "docid" in meta


def _generation_from_spec_row(row: dict, path: Path, line: int) -> Union[Generation, BadRowError]:
    fix = "write SPEC 3.2 rows (source_id, task, gen_index, text) or pass --skip-bad-rows"
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


def _generation_from_maga_row(row: dict, path: Path, line: int, next_index: dict[str, int]) -> Union[Generation, BadRowError]:
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
    source_id = f"{docid}#{chunk_id}"
    gen_index = next_index.get(source_id, 0)
    next_index[source_id] = gen_index + 1
    fields = {k: v for k, v in meta.items() if k != "raw_text"}
    fields.update({k: v for k, v in row.items() if k not in ("meta", "content_split")})
    return Generation(source_id, MAGA_TASK, gen_index, text, fields, str(path), line)


def iter_generations(
    paths: Union[PathLike, Iterable[PathLike]],
    skip_bad_rows: bool = False,
    counts: Optional[dict] = None,
) -> Iterator[Generation]:
    """Generations (SPEC 3.2 rows or MAGACorpus rows, mixed freely) in (sorted) file order.

    ``(source_id, task, gen_index)`` must be unique across all inputs; for MAGACorpus rows the
    gen_index is the row's rank among the rows of its source (``docid#chunk_id``) in input order.
    """
    counter = _Counter(counts, skip_bad_rows)
    seen: dict[tuple[str, str, int], tuple[str, int]] = {}
    maga_next: dict[str, int] = {}
    for path in expand_inputs(paths):
        for line, row in iter_rows(path):
            if isinstance(row, BadRowError):
                counter.bad(row)
                continue
            if is_maga_row(row):
                gen = _generation_from_maga_row(row, path, line, maga_next)
            elif "text" in row or "source_id" in row:
                gen = _generation_from_spec_row(row, path, line)
            else:
                gen = BadRowError(
                    path, line, "missing_text",
                    "row is neither a generation (source_id, task, gen_index, text) nor a MAGACorpus row (meta.docid, content_split)",
                    "write SPEC 3.2 generation rows or pass --skip-bad-rows",
                )
            if isinstance(gen, BadRowError):
                counter.bad(gen)
                continue
            key = (gen.source_id, gen.task, gen.gen_index)
            first = seen.get(key)
            if first is not None:
                counter.bad(BadRowError(
                    path, line, "duplicate_id",
                    f"duplicate generation (source_id={gen.source_id!r}, task={gen.task!r}, gen_index={gen.gen_index}) (first at {first[0]}:{first[1]})",
                    "remove the duplicate row or pass --skip-bad-rows",
                ))
                continue
            seen[key] = (str(path), line)
            counter.counts["rows"] += 1
            yield gen
