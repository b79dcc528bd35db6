"""Small shared helpers: logging, atomic writes, fingerprints, stable hashing, optional imports."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import sys
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional


def global_rank() -> int:
    """This process's global rank from the launcher's environment (0 outside distributed runs).

    torchrun and SLURM set ``RANK`` / ``SLURM_PROCID``; Lightning's own launcher sets
    ``NODE_RANK`` and ``LOCAL_RANK`` for the ranks it starts (rank 0 sets neither).
    """
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return int(os.environ.get("NODE_RANK", 0)) + int(os.environ.get("LOCAL_RANK", 0))


class _RankZero(logging.Filter):
    """Info and below from global rank 0 only; warnings and errors from every rank, tagged."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = global_rank()
        if rank != 0 and record.levelno < logging.WARNING:
            return False
        record.rank_tag = f" rank {rank}" if rank else ""
        return True


def get_logger(name: str) -> logging.Logger:
    """The ``megadoc_pl.<name>`` logger: ``[name] message`` lines on stderr, progress from rank 0 only.

    The handler sits on the ``megadoc_pl`` parent logger (added once), so applications may
    reconfigure or silence it with the standard ``logging`` calls.
    """
    root = logging.getLogger("megadoc_pl")
    if not any(isinstance(f, _RankZero) for h in root.handlers for f in h.filters):
        handler = _StderrHandler()
        handler.addFilter(_RankZero())
        handler.setFormatter(logging.Formatter("[%(short_name)s%(rank_tag)s] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    logger = logging.getLogger(f"megadoc_pl.{name}")
    logger.addFilter(_ShortName(name))
    return logger


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture, redirection)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _ShortName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.short = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.short_name = self.short
        return True


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, waiting: Optional[str] = None, shared: bool = False,
              wait: bool = True) -> Iterator[None]:
    """Hold an exclusive (or, with ``shared``, a shared) ``fcntl.flock`` on ``path`` (created if
    missing) for the block: shared holders run together, an exclusive one alone.

    ``waiting`` is logged (rank zero) when another process holds the lock and this one has to wait;
    with ``wait=False`` it does not wait but raises ``BlockingIOError``. The lock dies with its
    process, so a killed holder never leaves a stale lock.
    """
    import fcntl

    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if waiting:
                get_logger("lock").info(waiting)
            fcntl.flock(handle, mode)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class NotCached(Exception):
    """A preparation asked to read only what is cached met something it would have to build."""


def require(module: str, extra: str, what: str = "") -> Any:
    """Import an optional heavy dependency, or raise :class:`~megadoc_pl.errors.MissingDependency`
    with an install hint naming the extra (a front door prints it as one line)."""
    from megadoc_pl.errors import MissingDependency

    try:
        return importlib.import_module(module)
    except ImportError as e:
        need = f" for {what}" if what else ""
        raise MissingDependency(
            f"the optional package '{module}' is needed{need} but is not installed ({e}) "
            f"(fix: pip install 'megadoc_pl[{extra}]')"
        ) from None


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def content_id(text: str) -> str:
    """A stable document id derived from the content (used when a row has no id)."""
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def file_fingerprint(path: str | os.PathLike, known: Optional[Mapping[tuple, str]] = None) -> dict:
    """Name, size, mtime and sha256 of a file: what a cached artefact depends on.

    ``known`` is a stat cache, ``(path, size, mtime_ns) -> sha256`` recorded by an earlier call
    (token stores keep theirs in the manifest): a file whose stat matches is not read again, so
    relaunching on unchanged inputs costs a ``stat`` per file. A file rewritten with the same size
    inside the same mtime tick would be missed (the usual stat-cache trade-off; ``touch`` it or
    rebuild).
    """
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), int(st.st_size), int(st.st_mtime_ns))
    sha = (known or {}).get(key) or sha256_file(p)
    return {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": sha}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's content (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stat_cache(fingerprints: Iterable[Mapping[str, Any]]) -> dict[tuple, str]:
    """The ``known`` argument of :func:`file_fingerprint` from fingerprints recorded earlier."""
    return {(f["path"], int(f["size"]), int(f["mtime_ns"])): f["sha256"]
            for f in fingerprints if "mtime_ns" in f and "sha256" in f}


def json_fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of an object (configs, recipes)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def get_field(row: dict, dotted: str) -> Any:
    """Look up a possibly nested field ``a.b.c`` in a dict; KeyError if absent."""
    cur: Any = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def current_umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Any]:
    """A binary file that becomes ``path`` only when the block succeeds, so readers never see half a file.

    It is a temporary ``.NAME.XXXX<suffix>`` beside ``path`` (the same filesystem: the rename is
    not a copy), fsynced, renamed into place, and the directory fsynced so the rename survives a
    crash; if the block raises it is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        # mkstemp makes the file private (0600); results are ordinary files that colleagues read
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file via a temporary name and rename (:func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of the UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed value) of each non-blank line of a small JSONL side file.

    Corpus files go through megadoc_pl.data.readers (bad-row policy, compression); this is for
    task files, loss files and the like. Invalid JSON is a one-line error naming file and line.
    """
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}) (fix: one JSON object per line)") from None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
