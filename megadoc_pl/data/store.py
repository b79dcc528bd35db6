"""Token store (docs/data-ingest.md): a memory-mapped flat token file and its document index,
opened read-only; the files' format. :mod:`megadoc_pl.data.store_build` builds stores.

A store is a directory::

    manifest.json   format version, kind, counts, BOS/EOS, dtype, tokenizer + input fingerprints,
                    skipped-row counts (written last: a directory without it is not a store)
    tokens.bin      64-byte header (magic, version, itemsize, num_tokens) + flat token array
                    (uint16 when vocab_size <= 65535, else uint32); document i is
                    tokens[offsets[i]:offsets[i+1]] = [BOS] + encode(text) + [EOS]
    offsets.npy     int64, num_documents + 1 cumulative offsets
    index.parquet   one row per document: source_id, task, gen_index, file, line, promoted
                    generation fields (split_index, judge_score, genre, audience, style,
                    chunk_index) or, for documents, text_hash (data.hygiene's normalised
                    text hash of the source text), and
                    meta (the rest of the row / the generation fields, as JSON)

Offsets are 64-bit: one token file holds any number of tokens. ``manifest.json`` records a CRC32
per 16 MiB block of the three data files and their size and mtime (:func:`block_checksums`);
:meth:`TokenStore.open` re-checks the blocks of tokens.bin / offsets.npy when their size or mtime
changed since the build (an untouched store costs a ``stat``, a damaged one is refused naming the
file and block), and :meth:`TokenStore.verify` (``tools/prepare.py --verify DIR``) checks every
block of all three.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megadoc_pl.data.hygiene import member_mask

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


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def coerce_field(value: Any, typ: str, default: Any) -> Any:
    """A promoted field's value as its column's type (PROMOTED_FIELDS); ``default`` when missing or
    not convertible."""
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


# --------------------------------------------------------------------------------------------
# Reading a store


class TokenStore:
    """A built token store, opened read-only: tokens are a view into a memmap."""

    def __init__(self, path: Path, manifest: dict, tokens: np.ndarray, offsets: np.ndarray, index):
        self.path = path
        self.manifest = manifest
        self.token_array = tokens  # flat memmap of all tokens
        self.offsets_full = offsets  # (num_documents + 1,) int64 cumulative offsets
        self._index = index  # _LazyIndex: the columns of index.parquet but meta, read on first use
        self._meta_column: Optional[list] = None
        self._id_to_indices: Optional[dict[str, list[int]]] = None

    # -- opening

    @classmethod
    def open(cls, path: PathLike) -> "TokenStore":
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
            # mapped, not read: the ranks and loader workers of a node share one copy (0.8 GB at 100M documents)
            offsets = np.load(path / "offsets.npy", mmap_mode="r").view(np.ndarray)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path / 'offsets.npy'}: missing or unreadable ({_reason(e)}) {_REBUILD}") from None
        if offsets.shape != (manifest["num_documents"] + 1,) or offsets[-1] != num_tokens:
            raise ValueError(f"{path}: offsets.npy does not match manifest.json (fix: rebuild the store with --rebuild)")
        # A generation store repeats each source id G times and a few task names millions of times:
        # read dictionary-encoded, those two columns take ~4 bytes a row instead of ~14.
        index = _LazyIndex(path / "index.parquet",
                           dictionary=("source_id", "task") if manifest.get("kind") == "generations" else ())
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

    def meta_batches(self, docs: np.ndarray) -> Iterator[tuple[np.ndarray, Any]]:
        """Yield ``(rows, meta)``: positions into ``docs`` and the JSON fields of those documents
        (an Arrow string array), one record batch of index.parquet at a time (memory bounded by a
        batch, where :meth:`meta` reads the whole column once)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        docs = np.asarray(docs, np.int64)
        order = np.argsort(docs, kind="stable")
        sorted_docs = docs[order]
        lo = 0
        for batch in pq.ParquetFile(self.path / "index.parquet").iter_batches(columns=["meta"], batch_size=1 << 18):
            hi = lo + batch.num_rows
            a, b = np.searchsorted(sorted_docs, [lo, hi])
            if b > a:
                yield order[a:b], batch.column(0).take(pa.array(sorted_docs[a:b] - lo))
            lo = hi

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

    def release_columns(self) -> None:
        """Forget the index columns read so far (they are read again on next use): a paper-scale
        generation store's task, source_id and integer columns hold ~50 bytes a row."""
        self._index.release()

    @property
    def column_names(self) -> list[str]:
        """The index columns (``meta`` aside: :meth:`meta`, :meth:`meta_batches`)."""
        return list(self._index.column_names)

    def arrow_column(self, name: str):
        """An index column as Arrow (strings stay Arrow strings: no Python object per document)."""
        if name not in self._index.column_names:
            raise KeyError(f"{self.path}: index has no column {name!r} (columns: {', '.join(self._index.column_names)})")
        return self._index.column(name)

    def column(self, name: str) -> np.ndarray:
        """An index column as a numpy array (source_id, task, gen_index, file, line, or a promoted field)."""
        if name not in self._index.column_names and name in PROMOTED_FIELDS and self.kind == "generations":
            # A store built before the field was promoted: read it from the generation fields.
            typ, default = PROMOTED_FIELDS[name]
            values = [coerce_field(json.loads(m).get(name), typ, default) for m in self._metas()]
            return np.array(values, dtype=object if typ == "string" else typ)
        if name not in self._index.column_names:
            raise KeyError(f"{self.path}: index has no column {name!r} (columns: {', '.join(self._index.column_names)})")
        return self._index.column(name).to_numpy(zero_copy_only=False)

    def indices(self, ids: Iterable[str], exclude: bool = False) -> np.ndarray:
        """Sorted indices of documents whose source_id is in ``ids`` (or not in it, with exclude)."""
        mask = member_mask(self.arrow_column("source_id"), ids)
        return np.flatnonzero(~mask if exclude else mask)

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


class _LazyIndex:
    """index.parquet, each column read on first use (a dry run of a paper-scale generation store
    needs a few of its ten columns; reading all of them costs ~90 bytes per row). The file is
    opened with the store, so later reads see that file even if a rebuild replaces the store
    directory meanwhile (as the token memmap does)."""

    def __init__(self, path: Path, dictionary: tuple[str, ...] = ()):
        self.path, self.dictionary = path, tuple(dictionary)
        try:
            self._file = self._open()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError that names no file
            raise ValueError(f"{path}: missing or unreadable ({_reason(e)}) {_REBUILD}") from None
        self.num_rows = self._file.metadata.num_rows
        self.column_names = [n for n in self._file.schema_arrow.names if n != "meta"]
        self._columns: dict[str, Any] = {}

    def __getstate__(self) -> dict:  # for DataLoader workers: the columns read so far, not the file handle
        return {k: v for k, v in self.__dict__.items() if k != "_file"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _file=None)

    def _open(self):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.path, read_dictionary=list(self.dictionary) or None)

    def release(self) -> None:
        import pyarrow as pa

        self._columns.clear()
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed pages otherwise

    def column(self, name: str):
        if name not in self._columns:
            if self._file is None:  # unpickled in a worker: open the file on first need
                self._file = self._open()
            try:
                self._columns[name] = self._file.read(columns=[name]).column(name)
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path}: column {name!r} unreadable ({_reason(e)}) {_REBUILD}") from None
        return self._columns[name]


# --------------------------------------------------------------------------------------------
# The files: block checksums, the token file's header, the index schema

CHECKSUM_BLOCK_BYTES = 1 << 24
_CHECKED_FILES = ("tokens.bin", "offsets.npy", "index.parquet")


def _reason(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e)
    return text.splitlines()[0].strip() if text.strip() else type(e).__name__


def _block_crcs(path: Path, block: int) -> list[int]:
    import zlib

    with open(path, "rb") as f:
        return [zlib.crc32(chunk) for chunk in iter(lambda: f.read(block), b"")]


def block_checksums(directory: Path) -> dict:
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


def token_file_header(dtype: np.dtype, num_tokens: int) -> bytes:
    """The 64-byte header of tokens.bin (magic, format version, item size, token count)."""
    fields = np.array([FORMAT_VERSION, dtype.itemsize, num_tokens], dtype="<i8").tobytes()
    return (MAGIC + fields).ljust(HEADER_BYTES, b"\x00")


def index_schema(kind: str):
    """The Arrow schema of index.parquet for a store of ``kind`` (documents | generations)."""
    import pyarrow as pa

    fields = [("source_id", pa.string()), ("task", pa.string()), ("gen_index", pa.int64()), ("file", pa.int32()),
              ("line", pa.int64())]
    if kind == "generations":
        fields += [(name, pa.string() if typ == "string" else pa.from_numpy_dtype(np.dtype(typ)))
                   for name, (typ, _) in PROMOTED_FIELDS.items()]
    else:  # held-out hygiene compares documents by this hash of their normalised text (data/hygiene.py)
        fields += [("text_hash", pa.uint64())]
    return pa.schema(fields + [("meta", pa.string())])
