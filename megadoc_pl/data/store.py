"""Token store (SPEC 3.3): tokenize once, in parallel, into a memory-mapped flat token file.

A store is a directory::

    manifest.json   format version, kind, counts, BOS/EOS, dtype, tokenizer + input fingerprints,
                    skipped-row counts (written last: a directory without it is not a store)
    tokens.bin      64-byte header (magic, version, itemsize, num_tokens) + flat token array
                    (uint16 when vocab_size <= 65535, else uint32); document i is
                    tokens[offsets[i]:offsets[i+1]] = [BOS] + encode(text) + [EOS]
    offsets.npy     int64, num_documents + 1 cumulative offsets
    index.parquet   one row per document: source_id, task, gen_index, file, line, promoted
                    generation fields (split_index, judge_score, genre, audience, style) and
                    meta (the rest of the row / the generation fields, as JSON)

It is built under a temporary name and renamed (utils.atomic_dir), so an interrupted build
leaves no store. A later build with the same fingerprints reuses it; different fingerprints
are refused with a message naming what differs, or rebuilt when ``rebuild=True``.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megadoc_pl.data.readers import (
    REAL_TASK,
    Document,
    Generation,
    expand_inputs,
    iter_documents,
    iter_generations,
)
from megadoc_pl.data.tokenizer import TokenizerInfo, load_tokenizer
from megadoc_pl.utils import atomic_dir, atomic_write_json, file_fingerprint

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
}

# Work unit sent to a tokenizer worker: about this many characters of text.
CHUNK_CHARS = 1 << 20
# Below this many input bytes the pool start-up costs more than it saves: tokenize in-process.
SMALL_INPUT_BYTES = 4 << 20


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
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
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
        tokens = np.memmap(tpath, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
        offsets = np.load(path / "offsets.npy")
        if offsets.shape != (manifest["num_documents"] + 1,) or offsets[-1] != num_tokens:
            raise ValueError(f"{path}: offsets.npy does not match manifest.json (fix: rebuild the store with --rebuild)")
        schema_names = pq.read_schema(path / "index.parquet").names
        index = pq.read_table(path / "index.parquet", columns=[c for c in schema_names if c != "meta"])
        if index.num_rows != manifest["num_documents"]:
            raise ValueError(f"{path}: index.parquet does not match manifest.json (fix: rebuild the store with --rebuild)")
        return cls(path, manifest, tokens, offsets, index)

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
        if self._meta_column is None:
            import pyarrow.parquet as pq

            self._meta_column = pq.read_table(self.path / "index.parquet", columns=["meta"]).column("meta").to_pylist()
        return json.loads(self._meta_column[i])

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
# Tokenizer workers (one tokenizer per process, loaded once)

_WORKER: dict[str, Any] = {}


def _init_worker(json_str: str, dtype: str, bos_id: Optional[int], eos_id: Optional[int], single_threaded: bool) -> None:
    if single_threaded:
        # Several processes each running a rayon pool over all cores would oversubscribe them.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer

    _WORKER.update(tok=Tokenizer.from_str(json_str), dtype=np.dtype(dtype), bos=bos_id, eos=eos_id)


def _encode_chunk(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64, flat tokens) of ``texts`` with BOS/EOS added as configured."""
    tok, dtype, bos, eos = _WORKER["tok"], _WORKER["dtype"], _WORKER["bos"], _WORKER["eos"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
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


def _ping() -> int:
    return os.getpid()


def _start_pool(num_proc: int, initargs: tuple) -> cf.ProcessPoolExecutor:
    """Worker processes, started by fork where available.

    fork (not spawn) because spawn re-imports the caller's ``__main__``: a script without an
    ``if __name__ == "__main__"`` guard, ``python -c`` or a notebook would break. The workers only
    run the Rust tokenizer, so the usual fork hazards (locks held by other threads) do not apply.
    TOKENIZERS_PARALLELISM is set while forking so that the children do not warn about a rayon
    pool inherited from the parent (they run single-threaded anyway).
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


class _Encoder:
    """Runs _encode_chunk in worker processes (or in-process), bounded, results in order."""

    def __init__(self, info: TokenizerInfo, dtype: np.dtype, bos: Optional[int], eos: Optional[int], num_proc: int, in_process: bool):
        args = (info.json_str, dtype.str, bos, eos, not in_process)
        if in_process:
            # One helper thread: encode_batch releases the GIL and parallelises over cores in Rust,
            # while the main thread keeps reading the next chunk.
            _init_worker(*args)
            self.pool: cf.Executor = cf.ThreadPoolExecutor(max_workers=1)
            self.max_in_flight = 2
        else:
            self.pool = _start_pool(num_proc, args)
            self.max_in_flight = 2 * num_proc
        self.pending: collections.deque = collections.deque()

    def submit(self, texts: list[str]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Queue a chunk; yields the results that are ready (in order) when the queue is full."""
        self.pending.append(self.pool.submit(_encode_chunk, texts))
        while len(self.pending) >= self.max_in_flight:
            yield self.pending.popleft().result()

    def drain(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while self.pending:
            yield self.pending.popleft().result()

    def close(self) -> None:
        for fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


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
    progress: bool = True,
) -> TokenStore:
    """Tokenize ``inputs`` (documents or generations) into a token store at ``out_dir``.

    Reuses an existing store built from the same inputs, tokenizer and options; refuses (one-line
    ValueError naming what differs) when they differ, unless ``rebuild``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown store kind {kind!r} (fix: use one of {', '.join(KINDS)})")
    info = tokenizer if isinstance(tokenizer, TokenizerInfo) else load_tokenizer(tokenizer)
    info.require_special(add_bos, add_eos)
    files = expand_inputs(inputs)
    out = Path(out_dir)
    dtype = token_dtype(info.vocab_size)
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
        "inputs": [file_fingerprint(f) for f in files],
    }

    existing = _existing_store(out, manifest, rebuild)
    if existing is not None:
        return existing

    try:
        with atomic_dir(out, overwrite=rebuild) as tmp:
            _write_store(tmp, files, info, manifest, num_proc, progress)
    except FileExistsError:
        # Another process finished the same store first: use it if it is what we wanted.
        existing = _existing_store(out, manifest, rebuild=False)
        if existing is None:
            raise
        return existing
    return TokenStore.open(out)


def _existing_store(out: Path, manifest: dict, rebuild: bool) -> Optional[TokenStore]:
    if not out.exists():
        return None
    mpath = out / "manifest.json"
    if not mpath.is_file():
        raise ValueError(f"{out}: exists but is not a token store (no manifest.json) (fix: choose another output directory or remove it)")
    old = json.loads(mpath.read_text(encoding="utf-8"))
    old_key, new_key = _build_key(old), _build_key(manifest)
    if old_key == new_key:
        return TokenStore.open(out)
    if rebuild:
        return None
    what = _describe_mismatch(old_key, new_key)
    if old_key["inputs"] != new_key["inputs"]:
        what += f" [{_input_diff(old.get('inputs', []), manifest['inputs'])}]"
    raise ValueError(
        f"{out}: token store was built from different settings: {what} "
        f"(fix: pass --rebuild / data.rebuild=true, or use another output directory)"
    )


def _records(files: list[Path], manifest: dict, counts: dict) -> Iterator[Union[Document, Generation]]:
    if manifest["kind"] == "documents":
        return iter_documents(files, manifest["text_field"], manifest["id_field"], manifest["skip_bad_rows"], counts)
    return iter_generations(files, manifest["skip_bad_rows"], counts)


def _write_store(tmp: Path, files: list[Path], info: TokenizerInfo, manifest: dict, num_proc: Optional[int], progress: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    dtype = np.dtype(manifest["dtype"])
    num_proc = max(1, num_proc or default_num_proc())
    total_bytes = sum(f["size"] for f in manifest["inputs"])
    in_process = num_proc == 1 or total_bytes < SMALL_INPUT_BYTES
    file_index = {str(f): k for k, f in enumerate(files)}
    counts: dict = {}

    cols: dict[str, list] = {k: [] for k in ("source_id", "task", "gen_index", "file", "line", "meta")}
    promoted: dict[str, list] = {k: [] for k in PROMOTED_FIELDS}
    offsets = [np.zeros(1, dtype=np.int64)]
    num_tokens = 0
    encoder = _Encoder(info, dtype, manifest["bos_id"], manifest["eos_id"], num_proc, in_process)
    bar = tqdm(desc=f"tokenizing {manifest['kind']}", unit=" doc", disable=not progress or None, leave=False)

    with open(tmp / "tokens.bin", "wb") as fout:
        fout.write(b"\x00" * HEADER_BYTES)  # real header written once the count is known

        def write(results: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
            nonlocal num_tokens
            for lengths, flat in results:
                flat.tofile(fout)
                offsets.append(num_tokens + np.cumsum(lengths))
                num_tokens += int(flat.size)
                bar.update(len(lengths))

        try:
            texts: list[str] = []
            chars = 0
            for rec in _records(files, manifest, counts):
                _index_row(rec, cols, promoted, file_index)
                texts.append(rec.text)
                chars += len(rec.text)
                if chars >= CHUNK_CHARS:
                    write(encoder.submit(texts))
                    texts, chars = [], 0
            if texts:
                write(encoder.submit(texts))
            write(encoder.drain())
        finally:
            encoder.close()
            bar.close()
        if not cols["source_id"]:
            raise ValueError(
                f"{', '.join(str(f) for f in files[:3])}: no usable rows "
                f"({counts.get('bad_rows', 0)} bad rows skipped) (fix: check the input files and field names)"
            )
        fout.seek(0)
        fout.write(_header(dtype, num_tokens))

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
    if manifest["kind"] == "generations":
        for name, (typ, _) in PROMOTED_FIELDS.items():
            table[name] = pa.array(promoted[name], pa.string() if typ == "string" else typ)
    table["meta"] = pa.array(cols["meta"], pa.string())
    pq.write_table(pa.table(table), tmp / "index.parquet", compression="zstd")

    manifest = dict(manifest)
    manifest.update(
        num_documents=len(cols["source_id"]),
        num_tokens=num_tokens,
        bad_rows=counts.get("bad_rows", 0),
        bad_rows_by_kind=counts.get("bad_rows_by_kind", {}),
        build_seconds=round(time.perf_counter() - t0, 3),
        num_proc=1 if in_process else num_proc,
    )
    atomic_write_json(tmp / "manifest.json", manifest)


def _index_row(rec: Union[Document, Generation], cols: dict, promoted: dict, file_index: dict) -> None:
    if isinstance(rec, Document):
        cols["source_id"].append(rec.id)
        cols["task"].append(REAL_TASK)
        cols["gen_index"].append(-1)
        meta = rec.meta
    else:
        cols["source_id"].append(rec.source_id)
        cols["task"].append(rec.task)
        cols["gen_index"].append(rec.gen_index)
        meta = rec.fields
        for name, (typ, default) in PROMOTED_FIELDS.items():
            promoted[name].append(_coerce(meta.get(name), typ, default))
    cols["file"].append(file_index[rec.path])
    cols["line"].append(rec.line)
    cols["meta"].append(json.dumps(meta, ensure_ascii=False, default=str))


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
