"""Token store (SPEC 3.3): tokenize once, in parallel, into a memory-mapped flat token file.

A store is a directory::

    manifest.json   format version, kind, counts, BOS/EOS, dtype, tokenizer + input fingerprints,
                    skipped-row counts (written last: a directory without it is not a store)
    tokens.bin      64-byte header (magic, version, itemsize, num_tokens) + flat token array
                    (uint16 when vocab_size <= 65535, else uint32); document i is
                    tokens[offsets[i]:offsets[i+1]] = [BOS] + encode(text) + [EOS]
    offsets.npy     int64, num_documents + 1 cumulative offsets
    index.parquet   one row per document: source_id, task, gen_index, file, line, promoted
                    generation fields (split_index, judge_score, genre, audience, style,
                    chunk_index) and
                    meta (the rest of the row / the generation fields, as JSON)

It is built under a temporary name and renamed (utils.atomic_dir), so an interrupted build
leaves no store. ``manifest.json`` records a CRC32 per 16 MiB block of the three data files and
their size and mtime; :meth:`TokenStore.open` re-checks the blocks of tokens.bin / offsets.npy
when their size or mtime changed since the build (an untouched store costs a ``stat``, a damaged
one is refused naming the file and block), and :meth:`TokenStore.verify` (``tools/prepare.py
--verify DIR``) checks every block of all three. A later build with the same fingerprints reuses it; different fingerprints
are refused with a message naming what differs, or rebuilt when ``rebuild=True``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megadoc_pl.data.readers import (
    REAL_TASK,
    BadRowError,
    Document,
    RowChecker,
    decode_line,
    expand_inputs,
    is_parquet,
    jsonl_lines,
    open_parquet,
    parse_document,
    parse_generation,
)
from megadoc_pl.data.tokenizer import TokenizerInfo, load_tokenizer
from megadoc_pl.utils import atomic_dir, atomic_write_json, current_umask, file_fingerprint, stat_cache

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
MAGIC = b"MDPLTOK\x00"
HEADER_BYTES = 64
KINDS = ("documents", "generations")

# Generation fields copied into typed index columns for vectorised use (missing -> default).
PROMOTED_FIELDS: dict[str, tuple[str, Any]] = {
    "split_index": ("int64", -1),
    "judge_score": ("float64", float("nan")),
    "genre": ("string", ""),
    "audience": ("string", ""),
    "style": ("string", ""),
    "chunk_index": ("int64", -1),  # --long-sources chunk: which chunk of the source was rewritten
}

# Work unit sent to a worker: about this many bytes of JSONL, or this many Parquet rows.
CHUNK_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
# parallel="auto": worker processes only for inputs of at least this many bytes (below, starting
# them costs more than they save) and at least this many cores (below, threads are as fast: the
# Rust tokenizer runs without the GIL, and the GIL-bound rest, ~0.2 us per token for parsing and
# id conversion, only becomes the bottleneck at about 5 cores).
SMALL_INPUT_BYTES = 4 << 20
PROCESSES_FROM_CORES = 5
PARALLEL_MODES = ("auto", "threads", "processes")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------
# Reading a store


class TokenStore:
    """A built token store, opened read-only: tokens are a view into a memmap."""

    def __init__(self, path: Path, manifest: dict, tokens: np.ndarray, offsets: np.ndarray, index):
        self.path = path
        self.manifest = manifest
        self.token_array = tokens  # flat memmap of all tokens
        self.offsets_full = offsets  # (num_documents + 1,) int64 cumulative offsets
        self._index = index  # pyarrow Table without the meta column
        self._meta_column: Optional[list] = None
        self._id_to_indices: Optional[dict[str, list[int]]] = None

    # -- opening

    @classmethod
    def open(cls, path: PathLike) -> "TokenStore":
        import pyarrow.parquet as pq

        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise ValueError(f"{path}: not a token store (no manifest.json) (fix: build it with tools/prepare.py)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{mpath}: unreadable ({e}) {_REBUILD}") from None
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{path}: token store format_version {version}, this code reads {FORMAT_VERSION} "
                f"(fix: rebuild it with tools/prepare.py --rebuild)"
            )
        dtype = np.dtype(manifest["dtype"])
        num_tokens = int(manifest["num_tokens"])
        tpath = path / "tokens.bin"
        _check_header(tpath, dtype, num_tokens)
        if num_tokens:
            tokens = np.memmap(tpath, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
        else:  # documents that all encode to nothing, without BOS/EOS: mmap cannot map 0 bytes
            tokens = np.zeros(0, dtype=dtype)
        _check_blocks(path, manifest, only_touched=True, names=("tokens.bin", "offsets.npy"))
        try:
            offsets = np.load(path / "offsets.npy")
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path / 'offsets.npy'}: missing or unreadable ({_reason(e)}) {_REBUILD}") from None
        if offsets.shape != (manifest["num_documents"] + 1,) or offsets[-1] != num_tokens:
            raise ValueError(f"{path}: offsets.npy does not match manifest.json (fix: rebuild the store with --rebuild)")
        try:
            schema_names = pq.read_schema(path / "index.parquet").names
            index = pq.read_table(path / "index.parquet", columns=[c for c in schema_names if c != "meta"])
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError that names no file
            raise ValueError(f"{path / 'index.parquet'}: missing or unreadable ({_reason(e)}) {_REBUILD}") from None
        if index.num_rows != manifest["num_documents"]:
            raise ValueError(f"{path}: index.parquet does not match manifest.json (fix: rebuild the store with --rebuild)")
        return cls(path, manifest, tokens, offsets, index)

    def verify(self) -> int:
        """Check every block of the store's files against manifest.json; returns the bytes checked."""
        if not self.manifest.get("checksums"):
            raise ValueError(f"{self.path}: manifest.json records no checksums (built by an older version) {_REBUILD}")
        return _check_blocks(self.path, self.manifest, only_touched=False)

    # -- sizes and flags

    @property
    def num_documents(self) -> int:
        return int(self.manifest["num_documents"])

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["num_tokens"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def add_bos(self) -> bool:
        return bool(self.manifest["add_bos"])

    @property
    def add_eos(self) -> bool:
        return bool(self.manifest["add_eos"])

    @property
    def bos_id(self) -> Optional[int]:
        return self.manifest["bos_id"]

    @property
    def eos_id(self) -> Optional[int]:
        return self.manifest["eos_id"]

    @property
    def dtype(self) -> np.dtype:
        return self.token_array.dtype

    @property
    def offsets(self) -> np.ndarray:
        """(num_documents,) int64 start of each document in ``token_array``."""
        return self.offsets_full[:-1]

    @property
    def lengths(self) -> np.ndarray:
        """(num_documents,) int64 stored length of each document (BOS/EOS included)."""
        return np.diff(self.offsets_full)

    @property
    def content_lengths(self) -> np.ndarray:
        """(num_documents,) int64 length without the stored BOS/EOS."""
        return self.lengths - int(self.add_bos) - int(self.add_eos)

    def __len__(self) -> int:
        return self.num_documents

    # -- per document

    def tokens(self, i: int) -> np.ndarray:
        """Document i's tokens (a read-only view into the memmap), BOS/EOS included if recorded."""
        return self.token_array[self.offsets_full[i] : self.offsets_full[i + 1]]

    def content_tokens(self, i: int) -> np.ndarray:
        """Document i's tokens without the stored BOS/EOS."""
        lo = self.offsets_full[i] + int(self.add_bos)
        hi = self.offsets_full[i + 1] - int(self.add_eos)
        return self.token_array[lo:hi]

    def source_id(self, i: int) -> str:
        return self._index.column("source_id")[i].as_py()

    def task(self, i: int) -> str:
        return self._index.column("task")[i].as_py()

    def gen_index(self, i: int) -> int:
        return int(self._index.column("gen_index")[i].as_py())

    def location(self, i: int) -> tuple[str, int]:
        """(input file, line) the document came from."""
        f = self._index.column("file")[i].as_py()
        return self.manifest["inputs"][f]["path"], int(self._index.column("line")[i].as_py())

    def meta(self, i: int) -> dict:
        """The rest of the input row (documents) or the generation's task fields (generations)."""
        return json.loads(self._metas()[i])

    def _metas(self) -> list[str]:
        if self._meta_column is None:
            import pyarrow.parquet as pq

            self._meta_column = pq.read_table(self.path / "index.parquet", columns=["meta"]).column("meta").to_pylist()
        return self._meta_column

    # -- vectorised access

    @property
    def source_ids(self) -> np.ndarray:
        """(num_documents,) object array of source ids."""
        return self.column("source_id")

    @property
    def tasks(self) -> np.ndarray:
        return self.column("task")

    @property
    def gen_indices(self) -> np.ndarray:
        return self.column("gen_index")

    def column(self, name: str) -> np.ndarray:
        """An index column as a numpy array (source_id, task, gen_index, file, line, or a promoted field)."""
        if name not in self._index.column_names and name in PROMOTED_FIELDS and self.kind == "generations":
            # A store built before the field was promoted: read it from the generation fields.
            typ, default = PROMOTED_FIELDS[name]
            values = [_coerce(json.loads(m).get(name), typ, default) for m in self._metas()]
            return np.array(values, dtype=object if typ == "string" else typ)
        if name not in self._index.column_names:
            raise KeyError(f"{self.path}: index has no column {name!r} (columns: {', '.join(self._index.column_names)})")
        return self._index.column(name).to_numpy(zero_copy_only=False)

    def indices(self, ids: Iterable[str], exclude: bool = False) -> np.ndarray:
        """Sorted indices of documents whose source_id is in ``ids`` (or not in it, with exclude)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        mask = pc.is_in(self._index.column("source_id"), value_set=pa.array(list(ids), type=pa.string()))
        mask_np = mask.to_numpy(zero_copy_only=False)
        return np.flatnonzero(~mask_np if exclude else mask_np)

    def find(self, source_id: str) -> list[int]:
        """Indices of all documents with this source_id (its generations, or the one document)."""
        if self._id_to_indices is None:
            table: dict[str, list[int]] = collections.defaultdict(list)
            for i, sid in enumerate(self._index.column("source_id").to_pylist()):
                table[sid].append(i)
            self._id_to_indices = dict(table)
        return list(self._id_to_indices.get(source_id, []))

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, kind={self.kind}, documents={self.num_documents}, tokens={self.num_tokens})"


_REBUILD = "(fix: rebuild the store: data.rebuild=true, or tools/prepare.py --rebuild)"
CHECKSUM_BLOCK_BYTES = 1 << 24
_CHECKED_FILES = ("tokens.bin", "offsets.npy", "index.parquet")


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.splitlines()[0].strip() if text.strip() else type(e).__name__


def _block_crcs(path: Path, block: int) -> list[int]:
    import zlib

    with open(path, "rb") as f:
        return [zlib.crc32(chunk) for chunk in iter(lambda: f.read(block), b"")]


def _checksums(directory: Path) -> dict:
    """What manifest.json records to verify the data files: CRC32 per block, size and mtime."""
    files = {}
    for name in _CHECKED_FILES:
        st = (directory / name).stat()
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "crc32": _block_crcs(directory / name, CHECKSUM_BLOCK_BYTES)}
    return {"block_bytes": CHECKSUM_BLOCK_BYTES, "files": files}


def _check_blocks(path: Path, manifest: dict, only_touched: bool, names: Sequence[str] = _CHECKED_FILES) -> int:
    """Compare data files with their recorded block CRCs (``only_touched``: those whose size or mtime
    changed since the build); one-line error naming the file and the first bad block. On open only
    the token and offset arrays are checked: pyarrow checks index.parquet's structure itself."""
    rec = manifest.get("checksums")
    if not rec:
        return 0
    block, checked = int(rec["block_bytes"]), 0
    for name, want in rec["files"].items():
        if name not in names:
            continue
        f = path / name
        try:
            st = f.stat()
        except OSError as e:
            raise ValueError(f"{f}: missing or unreadable ({_reason(e)}) {_REBUILD}") from None
        if only_touched and (st.st_size, st.st_mtime_ns) == (want["size"], want["mtime_ns"]):
            continue
        got = _block_crcs(f, block)
        checked += st.st_size
        for k in range(max(len(got), len(want["crc32"]))):
            if k >= len(got) or k >= len(want["crc32"]) or got[k] != want["crc32"][k]:
                raise ValueError(
                    f"{f}: block {k} (bytes {k * block}..{(k + 1) * block - 1}) differs from the checksum in "
                    f"manifest.json: the file changed after the store was built {_REBUILD}")
    return checked


def _check_header(tpath: Path, dtype: np.dtype, num_tokens: int) -> None:
    with open(tpath, "rb") as f:
        head = f.read(HEADER_BYTES)
    size = tpath.stat().st_size
    if len(head) < HEADER_BYTES or head[:8] != MAGIC:
        raise ValueError(f"{tpath}: not a megadoc_pl token file (bad magic) (fix: rebuild the store with --rebuild)")
    version, itemsize, count = np.frombuffer(head[8:32], dtype="<i8")
    if version != FORMAT_VERSION or itemsize != dtype.itemsize or count != num_tokens:
        raise ValueError(
            f"{tpath}: header (version {version}, itemsize {itemsize}, tokens {count}) does not match "
            f"manifest.json (version {FORMAT_VERSION}, itemsize {dtype.itemsize}, tokens {num_tokens}) "
            f"(fix: rebuild the store with --rebuild)"
        )
    if size != HEADER_BYTES + num_tokens * dtype.itemsize:
        raise ValueError(f"{tpath}: file is {size} bytes, expected {HEADER_BYTES + num_tokens * dtype.itemsize} (fix: rebuild the store with --rebuild)")


def _header(dtype: np.dtype, num_tokens: int) -> bytes:
    fields = np.array([FORMAT_VERSION, dtype.itemsize, num_tokens], dtype="<i8").tobytes()
    return (MAGIC + fields).ljust(HEADER_BYTES, b"\x00")


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
    """Rows of one input file: raw JSONL lines, or a Parquet record batch and its first row number."""

    path: str
    lines: Optional[list[tuple[int, bytes]]] = None
    batch: Any = None
    first_row: int = 1


@dataclass
class _Parsed:
    """A worker's answer for one chunk: every row parsed (texts dropped), tokens of the good ones."""

    records: list  # Document / Generation (text "", meta/fields {}) or BadRowError, in row order
    metas: list  # JSON of each good record's meta / fields (None for bad rows)
    promoted: list  # PROMOTED_FIELDS values of each good generation (None otherwise)
    lengths: np.ndarray  # (good rows,) int64 stored lengths
    flat: np.ndarray  # tokens of the good rows, BOS/EOS included


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


def _process(tok, opts: _Options, chunk: _Chunk) -> _Parsed:
    """Parse, validate and tokenize one chunk; the order-dependent checks are left to the caller."""
    if chunk.lines is not None:
        rows: Iterable = ((line, decode_line(raw, chunk.path, line)) for line, raw in chunk.lines)
    else:
        rows = enumerate(chunk.batch.to_pylist(), start=chunk.first_row)
    records, texts = [], []
    for line, row in rows:
        if opts.kind == "documents":
            rec = parse_document(row, chunk.path, line, opts.text_field, opts.id_field)
        else:
            rec = parse_generation(row, chunk.path, line)
        records.append(rec)
        if not isinstance(rec, BadRowError):
            texts.append(rec.text)
    lengths, flat = _encode(tok, opts.dtype, opts.bos, opts.eos, texts)
    metas, promoted = [], []
    for rec in records:
        if isinstance(rec, BadRowError):
            metas.append(None)
            promoted.append(None)
            continue
        rec.text = ""  # not sent back: the tokens are
        if isinstance(rec, Document):
            metas.append(json.dumps(rec.meta, ensure_ascii=False, default=str))
            promoted.append(None)
            rec.meta = {}
        else:
            metas.append(json.dumps(rec.fields, ensure_ascii=False, default=str))
            promoted.append(tuple(_coerce(rec.fields.get(k), typ, dflt) for k, (typ, dflt) in PROMOTED_FIELDS.items()))
            rec.fields = {}
    return _Parsed(records, metas, promoted, lengths, flat)


def _encode(tok, dtype: np.dtype, bos: Optional[int], eos: Optional[int], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, flat tokens) of ``texts`` with BOS/EOS added as configured."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets: same ids, less work
    encs = encode(texts, add_special_tokens=False)
    extra = (bos is not None) + (eos is not None)
    lengths = np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs)) + extra
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    pos = 0
    for enc, n in zip(encs, lengths.tolist()):
        if bos is not None:
            flat[pos] = bos
        lo = pos + (bos is not None)
        hi = pos + n - (eos is not None)
        flat[lo:hi] = enc.ids
        if eos is not None:
            flat[hi] = eos
        pos += n
    return lengths, flat


def _coerce(value: Any, typ: str, default: Any) -> Any:
    if value is None:
        return default
    try:
        if typ == "int64":
            return int(value)
        if typ == "float64":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        return default


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
            # the main thread reads ahead.
            self.pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=2)
            self.max_in_flight = 3
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
    for path in files:
        if is_parquet(path):
            first = 1
            for batch in open_parquet(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
                yield _Chunk(str(path), batch=batch, first_row=first)
                first += batch.num_rows
            continue
        lines: list[tuple[int, bytes]] = []
        size = 0
        for line, raw in jsonl_lines(path):
            lines.append((line, raw))
            size += len(raw)
            if size >= CHUNK_BYTES:
                yield _Chunk(str(path), lines=lines)
                lines, size = [], 0
        if lines:
            yield _Chunk(str(path), lines=lines)


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
) -> TokenStore:
    """Tokenize ``inputs`` (documents or generations) into a token store at ``out_dir``.

    Reuses an existing store built from the same inputs, tokenizer and options; refuses (one-line
    ValueError naming what differs) when they differ, unless ``rebuild``. ``num_proc`` cores
    (default: all available); ``parallel`` = threads (one process; the Rust tokenizer uses the
    cores), processes (``num_proc`` forked workers parse and tokenize) or auto (processes for
    large inputs on >= PROCESSES_FROM_CORES cores). The result does not depend on either.
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
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; a store is an ordinary directory
    kind = manifest["kind"]
    opts = _Options(kind, manifest["text_field"], manifest["id_field"], np.dtype(manifest["dtype"]), manifest["bos_id"], manifest["eos_id"])
    num_proc = max(1, num_proc or default_num_proc())
    total_bytes = sum(f["size"] for f in manifest["inputs"])
    if parallel == "auto":
        in_process = num_proc < PROCESSES_FROM_CORES or total_bytes < SMALL_INPUT_BYTES
    else:
        in_process = parallel == "threads" or num_proc == 1
    file_index = {str(f): k for k, f in enumerate(files)}
    counts: dict = {}
    checker = RowChecker(manifest["skip_bad_rows"], counts)

    cols: dict[str, list] = {k: [] for k in ("source_id", "task", "gen_index", "file", "line", "meta")}
    promoted: list[tuple] = []
    offsets = [np.zeros(1, dtype=np.int64)]
    num_tokens = 0
    workers = _Workers(info, opts, num_proc, in_process)
    bar = tqdm(desc=f"tokenizing {kind}", unit=" doc", disable=not progress or None, leave=False)

    with open(tmp / "tokens.bin", "wb") as fout:
        fout.write(b"\x00" * HEADER_BYTES)  # real header written once the count is known

        def write(results: Iterator[_Parsed]) -> None:
            nonlocal num_tokens
            for res in results:
                keep = []  # per good row: accepted by the in-order checks (duplicates are not)
                for rec, meta, prom in zip(res.records, res.metas, res.promoted):
                    ok = checker.accept(rec)
                    if not isinstance(rec, BadRowError):
                        keep.append(ok)
                    if ok:
                        cols["source_id"].append(rec.id if kind == "documents" else rec.source_id)
                        cols["task"].append(REAL_TASK if kind == "documents" else rec.task)
                        cols["gen_index"].append(-1 if kind == "documents" else rec.gen_index)
                        cols["file"].append(file_index[rec.path])
                        cols["line"].append(rec.line)
                        cols["meta"].append(meta)
                        if prom is not None:
                            promoted.append(prom)
                lengths, flat = res.lengths, res.flat
                if not all(keep):
                    keep_np = np.array(keep, dtype=bool)
                    flat, lengths = flat[np.repeat(keep_np, lengths)], lengths[keep_np]
                flat.tofile(fout)
                offsets.append(num_tokens + np.cumsum(lengths))
                num_tokens += int(flat.size)
                bar.update(len(lengths))

        try:
            for chunk in _chunks(files):
                write(workers.submit(chunk))
            write(workers.drain())
        finally:
            workers.close()
            bar.close()
        if not cols["source_id"]:
            raise ValueError(
                f"{', '.join(str(f) for f in files[:3])}: no usable rows "
                f"({counts.get('bad_rows', 0)} bad rows skipped) (fix: check the input files and field names)"
            )
        fout.seek(0)
        fout.write(_header(opts.dtype, num_tokens))

    offsets_np = np.concatenate(offsets)
    assert offsets_np.shape == (len(cols["source_id"]) + 1,) and offsets_np[-1] == num_tokens
    np.save(tmp / "offsets.npy", offsets_np)

    table = {
        "source_id": pa.array(cols["source_id"], pa.string()),
        "task": pa.array(cols["task"], pa.string()),
        "gen_index": pa.array(cols["gen_index"], pa.int64()),
        "file": pa.array(cols["file"], pa.int32()),
        "line": pa.array(cols["line"], pa.int64()),
    }
    if kind == "generations":
        for k, (name, (typ, _)) in enumerate(PROMOTED_FIELDS.items()):
            table[name] = pa.array([p[k] for p in promoted], pa.string() if typ == "string" else typ)
    table["meta"] = pa.array(cols["meta"], pa.string())
    pq.write_table(pa.table(table), tmp / "index.parquet", compression="zstd")

    manifest = dict(manifest)
    manifest.update(
        num_documents=len(cols["source_id"]),
        num_tokens=num_tokens,
        bad_rows=counts["bad_rows"],
        bad_rows_by_kind=counts["bad_rows_by_kind"],
        build_seconds=round(time.perf_counter() - t0, 3),
        parallel="threads" if in_process else "processes",
        num_proc=num_proc,
        checksums=_checksums(tmp),
    )
    atomic_write_json(tmp / "manifest.json", manifest)


