"""Building a token store (docs/data-ingest.md): tokenize once, in parallel, into the files
:class:`~megadoc_pl.data.store.TokenStore` reads.

Building streams: the inputs are cut into ~1 MiB blocks of whole lines that workers (threads, or
forked processes on many cores) parse, validate and tokenize; the parent appends each block's
tokens, offsets and index rows to the files as they arrive and keeps a 16-byte identity key per
row, spilled to 256 bucket files every 256k rows, so memory does not grow with the rows.
Duplicates (and MAGACorpus repeats, which fold) are settled once at the end by sorting the keys
of each bucket, with the same outcome as reading the rows one by one (readers.RowChecker).
It is built under a temporary name and renamed (utils.atomic_dir), so an interrupted build
leaves no store; ``manifest.json`` records the block checksums that opening checks. A later
build with the same fingerprints reuses it; different fingerprints are refused with a message
naming what differs, or rebuilt when ``rebuild=True``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import functools
import hashlib
import itertools
import json
import json.encoder
import multiprocessing
import operator
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from megadoc_pl.data.hygiene import normalised_text_hash
from megadoc_pl.data.readers import (
    REAL_TASK,
    UNASSIGNED,
    BadRowError,
    Document,
    Generation,
    block_rows,
    orjson_loads,
    duplicate_error,
    expand_inputs,
    is_parquet,
    jsonl_blocks,
    open_parquet,
    parse_document,
    parse_generation,
)
from megadoc_pl.data.store import (FORMAT_VERSION, HEADER_BYTES, KINDS, PROMOTED_FIELDS, PathLike, TokenStore,
                                   block_checksums, coerce_field, index_schema, token_dtype, token_file_header)
from megadoc_pl.data.tokenizer import TokenizerInfo, load_tokenizer
from megadoc_pl.utils import (NotCached, atomic_dir, atomic_write_json, current_umask, file_fingerprint, stable_hash,
                              stat_cache)

# Work unit sent to a worker: about this many bytes of JSONL, or this many Parquet rows.
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
# parallel="auto": worker processes from 2 cores, for inputs of at least SMALL_INPUT_BYTES (below,
# starting them costs more than they save); threads otherwise. With threads the Rust tokenizer
# runs without the GIL, but parsing, validation, the text hash and id conversion hold it, so the
# pool waits on them. Measured on 2 quiet cores (BENCHMARKS.md "Tokenization"): short generation
# rows build at 0.83x raw encoding with processes and 0.70x with threads, long documents at
# 0.81x and 0.76x.
SMALL_INPUT_BYTES = 4 << 20
PARALLEL_MODES = ("auto", "threads", "processes")
# The shortcuts for plain generation rows: a JSONL block of them taken column by column
# (plain_generation_columns), other blocks' plain rows checked inline instead of by
# parse_generation, promoted columns already of their type taken as they are, meta written by
# one prebuilt JSON encoder. False takes the plain path for every row: the same store, slower
# (the tests build both and compare them).
FAST_PATHS = True


def default_num_proc() -> int:
    """The cores this process may run on: ``build_store``'s default ``num_proc``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Workers: parse + validate + tokenize one chunk of rows (one tokenizer per process, loaded once)


@dataclass
class _Options:
    kind: str
    text_field: str
    id_field: str
    dtype: np.dtype
    bos: Optional[int]
    eos: Optional[int]


@dataclass
class _Chunk:
    """Rows of one input file: a block of whole JSONL lines, or a Parquet record batch."""

    path: str
    file: int  # position of the file among the store's inputs
    first_line: int  # line (JSONL) or row (Parquet) number of the chunk's first row
    block: Optional[bytes] = None
    batch: Any = None


@dataclass
class _Parsed:
    """A worker's answer for one chunk: the good rows as index columns and tokens, the bad rows.

    Nothing per row outlives the chunk in the parent: the index is written as it arrives and each
    row leaves 16 bytes of identity key (plus 8 for MAGACorpus chunks that fold repeats), so the
    parent's memory does not grow with row objects.
    """

    index: Any  # pyarrow Table of the good rows (index_schema), gen_index -1 for unnumbered MAGA rows
    keys: np.ndarray  # (good, 2) uint64: 128-bit hash of each row's identity (id, or source_id/task/gen_index)
    unnumbered: np.ndarray  # positions of MAGACorpus generation rows the parent numbers within their source
    folds: np.ndarray  # positions of rows that fold repeats (MAGACorpus chunks read as documents)
    fold_hashes: np.ndarray  # (len(folds),) uint64 hash of their text
    bad: list  # (good rows before it, BadRowError), in row order
    lengths: np.ndarray  # (good,) int64 stored lengths
    flat: np.ndarray  # tokens of the good rows, BOS/EOS included


def _row_key(kind: str, source_id: str, task: str, gen_index: int) -> bytes:
    """16-byte identity of a row: its id (documents) or (source_id, task, gen_index) (generations)."""
    text = source_id if kind == "documents" else f"{source_id}\x00{task}\x00{gen_index}"
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


_WORKER: dict[str, Any] = {}
# Tokenizers the parent had loaded when it forked the workers, by fingerprint: a forked worker
# uses its inherited copy instead of parsing the JSON again (~0.3 s per worker for a 32k BPE).
_INHERITED: dict[str, Any] = {}


def _init_worker(json_str: str, fingerprint: str, opts: _Options) -> None:
    # Several processes each running a Rust thread pool over all cores would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    tok = _INHERITED.get(fingerprint)
    _WORKER.update(tok=tok if tok is not None else Tokenizer.from_str(json_str), opts=opts)


def _process_in_worker(chunk: _Chunk) -> _Parsed:
    return _process(_WORKER["tok"], _WORKER["opts"], chunk)


def _chunk_rows(chunk: _Chunk) -> Iterator[tuple[int, Any]]:
    if chunk.block is not None:
        return block_rows(chunk.first_line, chunk.block, chunk.path)
    return enumerate(chunk.batch.to_pylist(), start=chunk.first_line)


# One C encoder for every row's meta, built once: json.dumps(meta, ensure_ascii=False, default=str)
# builds a new one per call (~0.5 us). No circular check: rows come from a JSON or Parquet reader.
_META_JSON = json.JSONEncoder(ensure_ascii=False, default=str).encode
_META_ENCODER = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, str, json.encoder.encode_basestring, None, ": ", ", ", False, False, True)


def _meta_jsons(metas: list[dict]) -> list[str]:
    if not (FAST_PATHS and _META_ENCODER):
        return list(map(_META_JSON, metas))
    return list(map("".join, map(_META_ENCODER, metas, itertools.repeat(0))))


def _plain_generation_row(row: Any) -> bool:
    """Whether ``row`` is a generation row (docs/data-ingest.md) that parse_generation accepts as it
    is, checked inline (~1.5 us a row less): str text with a non-space character, non-empty str source_id and
    task, int gen_index >= 0. Anything else (ints as ids, MAGACorpus rows, bad rows) takes
    parse_generation. The text's UTF-8 check is the caller's (a block without \\ud escapes has no
    lone surrogates)."""
    if type(row) is not dict or "content_split" in row:
        return False
    text, sid, task, g = row.get("text"), row.get("source_id"), row.get("task"), row.get("gen_index")
    return (type(text) is str and text != "" and not text.isspace() and type(sid) is str and sid != ""
            and type(task) is str and task != "" and type(g) is int and g >= 0)


def _promoted_column(metas: list[dict], name: str, typ: str, default: Any) -> list:
    """The promoted field ``name`` of every row, coerced as coerce_field does; a column whose
    values are all missing or already of the column's type is taken as it is (FAST_PATHS)."""
    values = [m.get(name) for m in metas]
    exact = {"int64": int, "float64": float, "string": str}[typ]
    if FAST_PATHS and set(map(type, values)) <= {type(None), exact}:
        return [default if v is None else v for v in values]
    return [coerce_field(v, typ, default) for v in values]


def plain_generation_columns(block: Optional[bytes], first_line: int) -> Optional[tuple[list, ...]]:
    """(lines, source_ids, tasks, gen_indices, texts, metas) of a block of JSONL lines (the first
    numbered ``first_line``) whose every line is a generation row (docs/data-ingest.md) that
    parse_generation accepts as it is (_plain_generation_row's checks, made column by column with
    C-level maps: ~3 us a row less than the row loop); None for any other block, which takes the
    row loop. ``metas`` are the rows without the four fields. The builder's shortcut for a whole
    chunk (FAST_PATHS); public so that tests can tell which blocks take it."""
    # Lone surrogates need parse_generation's UTF-8 check; MAGACorpus rows (found without parsing,
    # so that a MAGACorpus file is not parsed twice) are numbered by the parent.
    if block is None or _may_hold_lone_surrogates(block) or b'"content_split"' in block:
        return None
    loads = orjson_loads(block)
    if loads is None:
        return None
    raws = block.split(b"\n")
    if raws and raws[-1] == b"":
        raws.pop()
    if not all(raws):  # a blank line is no row: its line number is skipped
        return None
    try:
        rows = list(map(loads, raws))
    except ValueError:
        return None
    if set(map(type, rows)) != {dict} or any(map(dict.__contains__, rows, itertools.repeat("content_split"))):
        return None
    texts, sids, tasks, gens = (list(map(dict.get, rows, itertools.repeat(k)))
                                for k in ("text", "source_id", "task", "gen_index"))
    strings = set(map(type, texts)) == set(map(type, sids)) == set(map(type, tasks)) == {str}
    if not (strings and set(map(type, gens)) == {int} and all(texts) and all(sids) and all(tasks)
            and min(gens) >= 0 and not any(map(str.isspace, texts))):
        return None
    for k in _GEN_FIELDS:  # what is left of a row is the meta parse_generation keeps, in its order
        collections.deque(map(dict.pop, rows, itertools.repeat(k)), maxlen=0)
    return list(range(first_line, first_line + len(rows))), sids, tasks, gens, texts, rows


_GEN_FIELDS = ("source_id", "task", "gen_index", "text")


def _may_hold_lone_surrogates(block: Optional[bytes]) -> bool:
    """Lone surrogates can only come from \\ud800-\\udfff escapes in JSON (Parquet strings are
    UTF-8): a block without ``\\ud`` holds none, and its valid rows need no UTF-8 check."""
    return block is not None and (b"\\ud" in block or b"\\uD" in block)


_KEY_HASH = functools.partial(hashlib.blake2b, digest_size=16)


def _generation_keys(sids: list, tasks: list, gens: list) -> bytes:
    """_row_key of many generation rows, concatenated, with C-level maps."""
    texts = map("{}\x00{}\x00{}".format, sids, tasks, gens)
    data = map(str.encode, texts, itertools.repeat("utf-8"), itertools.repeat("surrogatepass"))
    return b"".join(map(operator.methodcaller("digest"), map(_KEY_HASH, data)))


def _process_rows(opts: _Options, chunk: _Chunk) -> tuple:
    """The row loop of _process: (lines, source_ids, tasks, gen_indices, texts, metas, keys, bad,
    unnumbered, folds, fold_hashes, text_hashes) of the good rows, bad rows in row order."""
    documents = opts.kind == "documents"
    lines, sids, tasks, gens, texts, metas, keys = [], [], [], [], [], [], []
    bad, unnumbered, folds, fold_hashes, text_hashes = [], [], [], [], []
    inline = FAST_PATHS and not documents and not _may_hold_lone_surrogates(chunk.block)
    for line, row in _chunk_rows(chunk):
        if inline and _plain_generation_row(row):
            sid, task, gen_index, text = row.pop("source_id"), row.pop("task"), row.pop("gen_index"), row.pop("text")
            meta = row  # the rest of the row, in its order: what parse_generation keeps as fields
        else:
            rec = (parse_document(row, chunk.path, line, opts.text_field, opts.id_field) if documents
                   else parse_generation(row, chunk.path, line))
            if isinstance(rec, BadRowError):
                bad.append((len(texts), rec))
                continue
            text = rec.text
            if documents:
                sid, task, gen_index, meta = rec.id, REAL_TASK, -1, rec.meta
                text_hashes.append(normalised_text_hash(text))
                if rec.folds_repeats:
                    folds.append(len(texts))
                    fold_hashes.append(stable_hash(text))
            else:
                sid, task, gen_index, meta = rec.source_id, rec.task, rec.gen_index, rec.fields
                if gen_index == UNASSIGNED:
                    unnumbered.append(len(texts))
        keys.append(_row_key(opts.kind, sid, task, gen_index))
        for out, value in zip((lines, sids, tasks, gens, texts, metas), (line, sid, task, gen_index, text, meta)):
            out.append(value)
    return lines, sids, tasks, gens, texts, metas, b"".join(keys), bad, unnumbered, folds, fold_hashes, text_hashes


def _process(tok, opts: _Options, chunk: _Chunk) -> _Parsed:
    """Parse, validate and tokenize one chunk; the order-dependent checks are left to the parent."""
    import pyarrow as pa

    documents = opts.kind == "documents"
    whole = None if documents or not FAST_PATHS else plain_generation_columns(chunk.block, chunk.first_line)
    if whole is not None:
        lines, sids, tasks, gens, texts, metas = whole
        keys, bad, unnumbered, folds, fold_hashes, text_hashes = _generation_keys(sids, tasks, gens), [], [], [], [], []
    else:
        lines, sids, tasks, gens, texts, metas, keys, bad, unnumbered, folds, fold_hashes, text_hashes = \
            _process_rows(opts, chunk)
    lengths, flat = _encode(tok, opts.dtype, opts.bos, opts.eos, texts)
    schema = index_schema(opts.kind)
    arrays = {"source_id": sids, "task": tasks, "gen_index": gens, "line": lines,
              "file": np.full(len(texts), chunk.file, dtype=np.int32), "meta": _meta_jsons(metas)}
    if documents:
        arrays["text_hash"] = np.array(text_hashes, dtype=np.uint64)
    else:
        arrays.update((name, _promoted_column(metas, name, typ, dflt)) for name, (typ, dflt) in PROMOTED_FIELDS.items())
    index = pa.table({f.name: pa.array(arrays[f.name], f.type) for f in schema}, schema=schema)
    key_arr = np.frombuffer(keys, dtype=np.uint64).reshape(-1, 2).copy()
    return _Parsed(index, key_arr, np.array(unnumbered, np.int64), np.array(folds, np.int64),
                   np.array(fold_hashes, np.uint64), bad, lengths, flat)


def _encode(tok, dtype: np.dtype, bos: Optional[int], eos: Optional[int], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, flat tokens) of ``texts`` with BOS/EOS added as configured."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: same ids, less work
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    content = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(sizes.sum()))
    extra = (bos is not None) + (eos is not None)
    if not extra:
        return sizes, content
    lengths = sizes + extra
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    is_content = np.ones(flat.size, dtype=bool)
    if bos is not None:
        flat[ends - lengths] = bos
        is_content[ends - lengths] = False
    if eos is not None:
        flat[ends - 1] = eos
        is_content[ends - 1] = False
    flat[is_content] = content
    return lengths, flat


def _ping() -> int:
    return os.getpid()


def _start_pool(num_proc: int, initargs: tuple) -> cf.ProcessPoolExecutor:
    """Worker processes, started by fork where available.

    fork (not spawn) because spawn re-imports the caller's ``__main__``: a script without an
    ``if __name__ == "__main__"`` guard, ``python -c`` or a notebook would break. The workers only
    parse rows and run the Rust tokenizer, so the usual fork hazards (locks held by other threads)
    do not apply. TOKENIZERS_PARALLELISM is set while forking so that the children do not warn
    about a Rust thread pool inherited from the parent (they run single-threaded anyway).
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = cf.ProcessPoolExecutor(max_workers=num_proc, mp_context=ctx, initializer=_init_worker, initargs=initargs)
        # Start the workers now, while the variable is set (fork starts all of them at once).
        pool.submit(_ping).result()
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return pool


class _Workers:
    """Runs _process on chunks in worker processes (or threads), bounded, results in input order."""

    def __init__(self, info: TokenizerInfo, opts: _Options, num_proc: int, in_process: bool):
        self.in_process = in_process
        self.tok, self.opts = info.tokenizer, opts
        if in_process:
            # encode_batch releases the GIL and parallelises over cores in Rust, so threads suffice:
            # two chunks in flight keep the Rust pool busy while one chunk's stragglers finish and
            # the main thread reads ahead. On one core a second thread only contends for the GIL
            # (~5% slower, measured): one thread, while the main thread reads and writes.
            workers = 1 if num_proc == 1 else 2
            self.pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=workers)
            self.max_in_flight = workers + 1
        else:
            _INHERITED[info.fingerprint] = info.tokenizer
            try:
                self.pool = _start_pool(num_proc, (info.json_str, info.fingerprint, opts))
            finally:
                _INHERITED.pop(info.fingerprint, None)
            self.max_in_flight = 2 * num_proc
        self.pending: collections.deque = collections.deque()

    def submit(self, chunk: _Chunk) -> Iterator[_Parsed]:
        """Queue a chunk; yields the results that are ready (in order) when the queue is full."""
        if self.in_process:
            self.pending.append(self.pool.submit(_process, self.tok, self.opts, chunk))
        else:
            self.pending.append(self.pool.submit(_process_in_worker, chunk))
        while len(self.pending) >= self.max_in_flight:
            yield self.pending.popleft().result()

    def drain(self) -> Iterator[_Parsed]:
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _chunks(files: list[Path]) -> Iterator[_Chunk]:
    """The inputs cut into work units of about CHUNK_BYTES (JSONL) or PARQUET_BATCH_ROWS rows."""
    for k, path in enumerate(files):
        if is_parquet(path):
            first = 1
            for batch in open_parquet(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
                yield _Chunk(str(path), k, first, batch=batch)
                first += batch.num_rows
            continue
        for first, block in jsonl_blocks(path, CHUNK_BYTES):
            yield _Chunk(str(path), k, first, block=block)


# --------------------------------------------------------------------------------------------
# Building a store


def _build_key(manifest: dict) -> dict:
    """What a store depends on: compared field by field to decide reuse."""
    keys = ("format_version", "kind", "tokenizer_fingerprint", "add_bos", "add_eos", "skip_bad_rows", "text_field", "id_field")
    out = {k: manifest.get(k) for k in keys}
    out["inputs"] = [(f["sha256"], f["size"]) for f in manifest.get("inputs", [])]
    return out


def _describe_mismatch(old: dict, new: dict) -> str:
    diffs = []
    for k in old:
        if k == "inputs" or old[k] == new[k]:
            continue
        if k == "tokenizer_fingerprint":
            diffs.append(f"tokenizer (fingerprint {str(old[k])[:12]} vs {str(new[k])[:12]})")
        else:
            diffs.append(f"{k} ({old[k]!r} vs {new[k]!r})")
    if old["inputs"] != new["inputs"]:
        diffs.append(f"input files ({len(old['inputs'])} files vs {len(new['inputs'])}; contents differ)")
    return ", ".join(diffs)


def _input_diff(old_inputs: list[dict], new_inputs: list[dict]) -> str:
    old = {(f["sha256"], f["size"]): f["path"] for f in old_inputs}
    new = {(f["sha256"], f["size"]): f["path"] for f in new_inputs}
    changed = [new[k] for k in new if k not in old][:3]
    removed = [old[k] for k in old if k not in new][:3]
    parts = []
    if changed:
        parts.append("new or changed: " + ", ".join(changed))
    if removed:
        parts.append("no longer given: " + ", ".join(removed))
    return "; ".join(parts) or "same files in another order"


def build_store(
    inputs: Union[PathLike, Sequence[PathLike]],
    tokenizer: Union[PathLike, TokenizerInfo],
    out_dir: PathLike,
    *,
    kind: str = "documents",
    text_field: str = "text",
    id_field: str = "id",
    add_bos: bool = True,
    add_eos: bool = True,
    skip_bad_rows: bool = False,
    rebuild: bool = False,
    num_proc: Optional[int] = None,
    parallel: str = "auto",
    progress: bool = True,
    cached_only: bool = False,
) -> TokenStore:
    """Tokenize ``inputs`` (documents or generations) into a token store at ``out_dir``.

    Reuses an existing store built from the same inputs, tokenizer and options; refuses (one-line
    ValueError naming what differs) when they differ, unless ``rebuild``. ``num_proc`` cores
    (default: all available); ``parallel`` = threads (one process; the Rust tokenizer uses the
    cores), processes (``num_proc`` forked workers parse and tokenize) or auto (processes for
    inputs of SMALL_INPUT_BYTES or more on 2 cores or more). The result does not depend on either.
    ``cached_only`` raises :class:`~megadoc_pl.utils.NotCached` instead of building.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind!r} (fix: use one of {', '.join(KINDS)})")
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"unknown parallel mode {parallel!r} (fix: use one of {', '.join(PARALLEL_MODES)})")
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else load_tokenizer(tokenizer)
    info.require_special(add_bos, add_eos)
    files = expand_inputs(inputs)
    out = Path(out_dir)
    dtype = token_dtype(info.vocab_size)
    known = _recorded_fingerprints(out)  # stat cache: unchanged inputs are not hashed again
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tokenizer_fingerprint": info.fingerprint,
        "tokenizer_path": str(Path(info.path).resolve()),
        "vocab_size": info.vocab_size,
        "dtype": dtype.name,
        "add_bos": bool(add_bos),
        "add_eos": bool(add_eos),
        "bos_id": info.bos_id if add_bos else None,
        "eos_id": info.eos_id if add_eos else None,
        "tokenizer_bos_id": info.bos_id,
        "tokenizer_eos_id": info.eos_id,
        "skip_bad_rows": bool(skip_bad_rows),
        "text_field": text_field if kind == "documents" else None,
        "id_field": id_field if kind == "documents" else None,
        "inputs": [file_fingerprint(f, known=known) for f in files],
    }

    existing = _existing_store(out, manifest, rebuild)
    if existing is not None:
        return existing
    if cached_only:
        raise NotCached(f"token store {out}")

    try:
        with atomic_dir(out, overwrite=rebuild) as tmp:
            _write_store(tmp, files, info, manifest, num_proc, parallel, progress)
    except FileExistsError:
        # Another process finished the same store first: use it if it is what we wanted.
        existing = _existing_store(out, manifest, rebuild=False)
        if existing is None:
            raise
        return existing
    return TokenStore.open(out)


def _recorded_fingerprints(out: Path) -> dict[tuple, str]:
    """The stat cache of an existing store's manifest (empty when there is none or it is unreadable)."""
    try:
        return stat_cache(json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("inputs", []))
    except (OSError, ValueError):
        return {}


def _existing_store(out: Path, manifest: dict, rebuild: bool) -> Optional[TokenStore]:
    if not out.exists():
        return None
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"{out}: exists but is not a token store (no manifest.json) (fix: choose another output directory or remove it)")
    old = json.loads(mpath.read_text(encoding="utf-8"))
    old_key, new_key = _build_key(old), _build_key(manifest)
    if old_key == new_key:
        try:
            return TokenStore.open(out)
        except ValueError:  # damaged since it was built
            if rebuild:
                return None
            raise
    if rebuild:
        return None
    what = _describe_mismatch(old_key, new_key)
    if old_key["inputs"] != new_key["inputs"]:
        what += f" [{_input_diff(old.get('inputs', []), manifest['inputs'])}]"
    raise ValueError(
        f"{out}: token store was built from different settings: {what} "
        f"(fix: pass --rebuild / data.rebuild=true, or use another output directory)"
    )


def _write_store(tmp: Path, files: list[Path], info: TokenizerInfo, manifest: dict, num_proc: Optional[int],
                 parallel: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a store is an ordinary directory
    kind = manifest["kind"]
    opts = _Options(kind, manifest["text_field"], manifest["id_field"], np.dtype(manifest["dtype"]), manifest["bos_id"], manifest["eos_id"])
    num_proc = max(1, num_proc or default_num_proc())
    total_bytes = sum(f["size"] for f in manifest["inputs"])
    if parallel == "auto":
        in_process = total_bytes < SMALL_INPUT_BYTES or num_proc < 2
    else:
        in_process = parallel == "threads" or num_proc == 1
    sink = StoreSink(tmp, kind, opts.dtype, [str(f) for f in files], manifest["skip_bad_rows"])
    workers = _Workers(info, opts, num_proc, in_process)
    bar = tqdm(desc=f"tokenizing {kind}", unit=" doc", disable=not progress or None, leave=False)
    try:
        for chunk in _chunks(files):
            for res in workers.submit(chunk):
                bar.update(sink.add(res))
        for res in workers.drain():
            bar.update(sink.add(res))
        counts = sink.finish()
    finally:
        workers.close()
        bar.close()
        sink.close()

    manifest = dict(manifest)
    manifest.update(
        num_documents=counts["rows"],
        num_tokens=counts["tokens"],
        bad_rows=counts["bad_rows"],
        bad_rows_by_kind=counts["bad_rows_by_kind"],
        build_seconds=round(time.perf_counter() - t0, 3),
        parallel="threads" if in_process else "processes",
        num_proc=num_proc,
        checksums=block_checksums(tmp),
    )
    atomic_write_json(tmp / "manifest.json", manifest)


# Index rows buffered before a Parquet row group is written, and documents per compaction block.
INDEX_GROUP_ROWS = 1 << 16
COMPACT_BLOCK_DOCS = 1 << 20
COMPACT_BLOCK_TOKENS = 1 << 26
# Identity keys are held in memory up to KEY_SPILL_ROWS rows, then spilled to KEY_BUCKETS files.
KEY_SPILL_ROWS = 1 << 18
KEY_BUCKET_BITS = 8
KEY_BUCKETS = 1 << KEY_BUCKET_BITS
_KEY_RECORD = np.dtype([("k0", "<u8"), ("k1", "<u8"), ("row", "<i8")])


def _duplicates(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows whose key an earlier row has, that earlier (first) row), for keys (n, 2) of
    ``rows`` given in input order."""
    if len(keys) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))  # stable: equal keys stay in input order
    sk = keys[order]
    same = (sk[1:] == sk[:-1]).all(axis=1)
    if not same.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    run = np.cumsum(np.concatenate([[True], ~same])) - 1  # run (equal keys) of each sorted position
    starts = np.flatnonzero(np.concatenate([[True], ~same]))
    later = np.flatnonzero(same) + 1
    return rows[order[later]], rows[order[starts[run[later]]]]


class StoreSink:
    """The parent's side of a build: writes chunks in input order as they arrive, then settles the
    order-dependent checks (duplicate ids, MAGACorpus numbering and folding) with the same outcome
    as :class:`~megadoc_pl.data.readers.RowChecker` reading the rows one by one.

    Tokens go to tokens.bin, stored-document end offsets to a scratch file, index rows to a Parquet
    writer in row groups, identity keys (16 bytes a row) to bucket files by their top bits once
    KEY_SPILL_ROWS are buffered: memory is bounded by a chunk and the buffer, not by the rows.
    Duplicates are found once at the end by sorting the keys bucket by bucket; rows dropped then
    (duplicates skipped with ``skip_bad_rows``, repeats of a MAGACorpus chunk folded into its
    first row) are removed by one streaming compaction pass.
    """

    def __init__(self, tmp: Path, kind: str, dtype: np.dtype, files: list[str], skip_bad_rows: bool):
        import pyarrow.parquet as pq

        self.tmp, self.kind, self.dtype, self.files, self.skip = tmp, kind, dtype, files, skip_bad_rows
        self.schema = index_schema(kind)
        self.tokens = open(tmp / "tokens.bin", "wb")
        self.tokens.write(b"\x00" * HEADER_BYTES)  # real header written once the count is known
        self.ends = open(tmp / "ends.tmp", "wb")
        self.index = pq.ParquetWriter(tmp / "index.parquet", self.schema, compression="zstd")
        self.pending: list = []  # index tables not yet written as a row group
        self.pending_rows = 0
        self.keys: list[np.ndarray] = []  # identity keys of the rows since the last spill
        self.keys_from = 0  # row number of the first of them
        self.spilled = False
        self.folds: list[np.ndarray] = []
        self.fold_hashes: list[np.ndarray] = []
        self.maga_next: dict[str, int] = {}
        self.rows = self.num_tokens = 0
        self.counts: dict = {"rows": 0, "bad_rows": 0, "bad_rows_by_kind": {}}

    def add(self, res: _Parsed) -> int:
        """One chunk's results, in input order; returns the rows it held (good and bad)."""
        index, keys = res.index, res.keys
        if len(res.unnumbered):
            index, keys = self._number_maga(index, keys, res.unnumbered)
        self.keys.append(keys)
        if self.rows + len(keys) - self.keys_from >= KEY_SPILL_ROWS:
            self.spill_keys(self.rows + len(keys))
        if len(res.folds):
            self.folds.append(res.folds + self.rows)
            self.fold_hashes.append(res.fold_hashes)
        res.flat.tofile(self.tokens)
        (self.num_tokens + np.cumsum(res.lengths)).astype(np.int64).tofile(self.ends)
        self.num_tokens += int(res.flat.size)
        rows_before, self.rows = self.rows, self.rows + index.num_rows
        self.pending.append(index)
        self.pending_rows += index.num_rows
        if self.pending_rows >= INDEX_GROUP_ROWS:
            self._flush()
        for before, err in res.bad:
            if not self.skip:  # a duplicate before it in input order is the first error
                self._flush()
                self._raise_first_duplicate(limit=rows_before + before)
                raise err
            self._count_bad(err.kind)
        return index.num_rows + len(res.bad)

    def _number_maga(self, index, keys: np.ndarray, positions: np.ndarray):
        """MAGACorpus rows get gen_index = their rank among their source's rows in input order."""
        import pyarrow as pa

        gen_index = index.column("gen_index").to_numpy().copy()
        keys = keys.copy()
        sids, tasks = index.column("source_id"), index.column("task")
        for i in positions.tolist():
            sid = sids[i].as_py()
            gen_index[i] = g = self.maga_next.get(sid, 0)
            self.maga_next[sid] = g + 1
            keys[i] = np.frombuffer(_row_key(self.kind, sid, tasks[i].as_py(), g), dtype=np.uint64)
        k = index.schema.get_field_index("gen_index")
        return index.set_column(k, "gen_index", pa.array(gen_index, pa.int64())), keys

    def _count_bad(self, kind: str, n: int = 1) -> None:
        self.counts["bad_rows"] += n
        by_kind = self.counts["bad_rows_by_kind"]
        by_kind[kind] = by_kind.get(kind, 0) + n

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.index.write_table(pa.concat_tables(self.pending), row_group_size=max(self.pending_rows, 1))
            self.pending, self.pending_rows = [], 0

    def spill_keys(self, upto: int) -> None:
        """Append the buffered keys (rows before ``upto``), with their row numbers, to KEY_BUCKETS
        files by the key's top bits (every KEY_SPILL_ROWS rows; the rest once the keys are settled):
        duplicates share a bucket, and each bucket is settled on its own, so memory does not grow
        with the rows (~24 bytes a row on disk instead of ~60 in memory)."""
        keys = np.concatenate(self.keys) if self.keys else np.zeros((0, 2), np.uint64)
        assert len(keys) == upto - self.keys_from
        rec = np.empty(len(keys), dtype=_KEY_RECORD)
        rec["k0"], rec["k1"], rec["row"] = keys[:, 0], keys[:, 1], np.arange(self.keys_from, upto)
        bucket = (keys[:, 0] >> np.uint64(64 - KEY_BUCKET_BITS)).astype(np.int64)
        order = np.argsort(bucket, kind="stable")  # rows stay in input order within a bucket
        bounds = np.searchsorted(bucket[order], np.arange(KEY_BUCKETS + 1))
        (self.tmp / "keys").mkdir(exist_ok=True)
        for b in np.flatnonzero(np.diff(bounds)).tolist():
            with open(self.tmp / "keys" / f"{b:04d}.bin", "ab") as f:
                rec[order[bounds[b]:bounds[b + 1]]].tofile(f)
        self.keys, self.keys_from, self.spilled = [], upto, True

    def _key_groups(self, limit: Optional[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys (n, 2), row numbers) of the first ``limit`` rows, one bucket at a time once
        spilled (all in one group before), rows in input order within a group."""
        if not self.spilled:
            keys = np.concatenate(self.keys) if self.keys else np.zeros((0, 2), np.uint64)
            keys = keys[:limit]
            yield keys, np.arange(self.keys_from, self.keys_from + len(keys))
            return
        self.spill_keys(self.rows)
        for path in sorted((self.tmp / "keys").iterdir()):
            rec = np.fromfile(path, dtype=_KEY_RECORD)
            if limit is not None:
                rec = rec[rec["row"] < limit]
            yield np.stack([rec["k0"], rec["k1"]], axis=1), rec["row"]

    def _settle(self, limit: Optional[int] = None) -> tuple[list[int], list[tuple[int, int]]]:
        """(rows folded into an earlier copy, [(duplicate row, its first row)]) among the first
        ``limit`` rows, by sorting the identity keys (rows in input order within a key)."""
        pairs = [_duplicates(keys, rows) for keys, rows in self._key_groups(limit)]
        rows = np.concatenate([p[0] for p in pairs]) if pairs else np.zeros(0, np.int64)
        firsts = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0, np.int64)
        if not len(rows):
            return [], []
        fold_hash = {}
        if self.folds:
            fold_pos, hashes = np.concatenate(self.folds), np.concatenate(self.fold_hashes)
            wanted = np.isin(fold_pos, np.concatenate([rows, firsts]))
            fold_hash = dict(zip(fold_pos[wanted].tolist(), hashes[wanted].tolist()))
        folded, dups = [], []
        for r, f in zip(rows.tolist(), firsts.tolist()):
            if r in fold_hash and fold_hash[r] == fold_hash.get(f):
                folded.append(r)
            else:
                dups.append((r, f))
        return sorted(folded), sorted(dups)

    def _raise_first_duplicate(self, limit: Optional[int] = None) -> None:
        _, dups = self._settle(limit)
        if dups:
            row, first = dups[0]
            raise self._duplicate_error(row, first)

    def _duplicate_error(self, row: int, first: int) -> BadRowError:
        import pyarrow.parquet as pq

        self.index.close()
        table = pq.read_table(self.tmp / "index.parquet", columns=["source_id", "task", "gen_index", "file", "line"])
        r, f = (table.slice(i, 1).to_pylist()[0] for i in (row, first))
        path = self.files[r["file"]]
        if self.kind == "documents":
            rec: Any = Document(r["source_id"], "", {}, path, r["line"])
        else:
            rec = Generation(r["source_id"], r["task"], r["gen_index"], "", {}, path, r["line"])
        return duplicate_error(rec, (self.files[f["file"]], f["line"]))

    def finish(self) -> dict:
        """Settle duplicates, compact, write the header and offsets.npy; returns the counts."""
        self._flush()
        self.index.close()
        folded, dups = self._settle()
        if dups:
            if not self.skip:
                raise self._duplicate_error(*dups[0])
            self._count_bad("duplicate_id", len(dups))
        self.tokens.close()
        self.ends.close()
        shutil.rmtree(self.tmp / "keys", ignore_errors=True)
        drop = np.array(sorted(folded + [r for r, _ in dups]), dtype=np.int64)
        if len(drop):
            self._compact(drop)
        if self.rows == 0:
            raise ValueError(
                f"{', '.join(self.files[:3])}: no usable rows "
                f"({self.counts['bad_rows']} bad rows skipped) (fix: check the input files and field names)")
        with open(self.tmp / "tokens.bin", "r+b") as f:
            f.write(token_file_header(self.dtype, self.num_tokens))
        # offsets.npy = 0 followed by the end offsets, copied through a buffer (not held in memory)
        ends_path = self.tmp / "ends.tmp"
        assert ends_path.stat().st_size == 8 * self.rows
        assert not self.rows or np.fromfile(ends_path, np.int64, offset=8 * (self.rows - 1))[0] == self.num_tokens
        with open(self.tmp / "offsets.npy", "wb") as f, open(ends_path, "rb") as ends:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)),
                                                     "fortran_order": False, "shape": (self.rows + 1,)})
            np.zeros(1, np.int64).tofile(f)
            shutil.copyfileobj(ends, f, 1 << 24)
        ends_path.unlink()
        self.counts.update(rows=self.rows, tokens=self.num_tokens)
        return self.counts

    def _compact(self, drop: np.ndarray) -> None:
        """Remove rows ``drop`` from tokens.bin, the offsets and the index, streaming in blocks."""
        import pyarrow.parquet as pq

        ends = np.fromfile(self.tmp / "ends.tmp", dtype=np.int64)
        keep = np.ones(len(ends), dtype=bool)
        keep[drop] = False
        lengths = np.diff(ends, prepend=0)
        src = self.tmp / "tokens.bin"
        dst, new_ends = self.tmp / "tokens.compact", self.tmp / "ends.compact"
        tokens = np.memmap(src, dtype=self.dtype, mode="r", offset=HEADER_BYTES) if self.num_tokens else None
        total = 0
        with open(dst, "wb") as fout, open(new_ends, "wb") as fends:
            fout.write(b"\x00" * HEADER_BYTES)
            a = 0
            while a < len(ends):  # blocks of at most COMPACT_BLOCK_DOCS documents / COMPACT_BLOCK_TOKENS tokens
                start = int(ends[a - 1]) if a else 0
                b = int(np.searchsorted(ends, start + COMPACT_BLOCK_TOKENS, side="right"))
                b = min(len(ends), a + COMPACT_BLOCK_DOCS, max(b, a + 1))
                k, n = keep[a:b], lengths[a:b]
                if tokens is not None:
                    np.asarray(tokens[start : int(ends[b - 1])])[np.repeat(k, n)].tofile(fout)
                (total + np.cumsum(n[k])).astype(np.int64).tofile(fends)
                total += int(n[k].sum())
                a = b
        del tokens
        os.replace(dst, src)
        os.replace(new_ends, self.tmp / "ends.tmp")
        reader = pq.ParquetFile(self.tmp / "index.parquet")
        with pq.ParquetWriter(self.tmp / "index.compact", self.schema, compression="zstd") as writer:
            first = 0
            for g in range(reader.num_row_groups):
                table = reader.read_row_group(g)
                mask = keep[first : first + table.num_rows]
                first += table.num_rows
                writer.write_table(table.filter(mask), row_group_size=max(int(mask.sum()), 1))
        os.replace(self.tmp / "index.compact", self.tmp / "index.parquet")
        self.rows, self.num_tokens = int(keep.sum()), total

    def close(self) -> None:
        for f in (self.tokens, self.ends):
            f.close()
        self.index.close()
