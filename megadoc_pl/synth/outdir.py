"""Where a generation run writes: a local directory, or an fsspec URL (object storage).

A **local directory** (a path or ``file://``) is written as the runner always did: each output
file is appended in whole batches (flushed and fsynced), a torn last line left by a kill is cut
on the next start, a shard is locked with ``flock`` while a run writes it, and rewrites go
through a temporary file and a rename.

An **fsspec URL** (``s3://``, ``gs://``, ``memory://``, ...; the protocol's fsspec package must
be installed, e.g. ``s3fs``) cannot be appended to, so every logical file ``X.jsonl`` is a
folder ``X/`` of part files, one per completed batch (``part-<run>-<seq>.jsonl``), each written
in one PUT: a kill leaves whole parts or none, so resume and exactly-once hold as locally.
A shard is locked by a **lease** (:class:`LeaseLock`): an object created with an exclusive PUT
(``If-None-Match``), naming its holder and an expiry, renewed while the run writes and deleted at
the end; a second writer is refused in one line, and the lease of a killed run expires after
``LEASE_SECONDS`` so a later run can take the shard over.
Readers of the output (``tools/prepare.py``, ``data.synthetic``) take the downloaded folder as
is: directories are read recursively and ``.synth`` is hidden.

Inputs may be fsspec URLs too (``stage_inputs``): they are copied to a temporary folder for the
run, since the runner reads every document of the input to shard it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from megadoc_pl.utils import atomic_write_json, current_umask, get_logger

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PARTS_PER_FETCH = 64  # part files fetched together on resume (concurrently where the protocol can)


def stage_inputs(inputs: list[str], into: Path) -> list[str]:
    """Inputs with fsspec URLs (a file or a folder) downloaded under ``into``; local paths and
    file:// unchanged. The driver reads every input to shard it, so a copy is read once."""
    staged = []
    for k, item in enumerate(inputs):
        m = _URL.match(item)
        if m is None or m.group(1) == "file":
            staged.append(item[len("file://"):] if m else item)
            continue
        try:
            import fsspec

            fs, root = fsspec.core.url_to_fs(item)
        except (ImportError, ValueError) as e:
            raise ValueError(f"--input {item}: cannot open {m.group(1)}:// URLs here ({str(e).splitlines()[0]}) "
                             "(fix: install the fsspec package for that protocol, e.g. pip install s3fs)") from None
        if not fs.exists(root):
            raise ValueError(f"--input {item}: no such file or folder (fix: check the URL)")
        local = into / f"{k:03d}"
        if fs.isdir(root):
            fs.get(root.rstrip("/") + "/", str(local), recursive=True)
        else:
            local.mkdir(parents=True)
            local = local / root.rstrip("/").rsplit("/", 1)[-1]
            fs.get(root, str(local))
        staged.append(str(local))
    return staged


class ShardBusy(ValueError):
    """Another process holds the lock of this shard."""


def open_out_dir(out: str) -> "LocalDir | ObjectDir":
    """--out as a LocalDir (path or file://) or an ObjectDir (other fsspec URLs); a URL whose
    protocol cannot be opened here is one line, and never a local folder named 's3:'."""
    m = _URL.match(out)
    if m is None:
        return LocalDir(Path(out))
    if m.group(1) == "file":
        return LocalDir(Path(out[len("file://"):]))
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(out)
    except (ImportError, ValueError) as e:
        raise ValueError(f"--out {out}: cannot open {m.group(1)}:// URLs here ({str(e).splitlines()[0]}) "
                         "(fix: install the fsspec package for that protocol, e.g. pip install s3fs, "
                         "or write to a local directory)") from None
    return ObjectDir(fs, root.rstrip("/"), out.rstrip("/"))


class ShardLock:
    """An exclusive ``flock`` on a shard's lock file while a run writes it. The kernel releases it
    when the process ends (a killed run leaves no stale lock). On NFS v4 flock is a POSIX lock
    and holds across nodes; Lustre needs the ``flock`` mount option."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self.f = None
        self.created: list[Path] = []  # directories this lock created (removed by discard)
        self.new_file = False  # acquire created the lock file (removed by discard)

    def acquire(self) -> None:
        import fcntl

        for d in reversed(self.path.parents):
            if not d.exists():
                self.created.append(d)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.new_file = not self.path.exists()
        f = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ShardBusy(f"{self.what} is being written by {holder} (fix: wait for that run to end, "
                            "or give this one another --out or --shard)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        f.flush()
        self.f = f

    def release(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def discard(self) -> None:
        """Release, and remove the lock file and the directories acquire created (a failed start)."""
        if self.created or self.new_file:
            self.path.unlink(missing_ok=True)
        self.release()
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                pass  # not empty: someone else wrote there meanwhile


def repair_tail(path: Path) -> int:
    """Cut a torn last line (no trailing newline: the writer was killed); returns bytes cut."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        pos = size
        while pos > 0:
            step = min(1 << 16, pos)
            f.seek(pos - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        else:
            keep = 0
        if keep == size:
            return 0
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def read_jsonl(path: Path) -> Iterator[dict]:
    """Rows of a file this runner wrote (after repair_tail); a corrupt line is a clear error."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(
                    f"{path}:{lineno}: corrupt line in a generation file "
                    "(fix: delete that line; the next run regenerates it)"
                ) from None


def rewrite_rows(path: Path, update) -> int:
    """Stream ``path`` through ``update(row) -> bool`` (True: changed) into a temporary file and
    rename it over ``path`` (readers and a kill see the old or the new file, never half of one).
    Returns the number of rows changed; the file is left alone when none is."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    changed = 0
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in read_jsonl(path):
                changed += bool(update(row))
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if changed:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return changed


class Appender:
    """Append JSON lines in whole batches, flushed and fsynced before returning."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class LocalDir:
    """A local output directory: appended files, flock, rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def join(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def appender(self, path: Path) -> Appender:
        return Appender(path)

    def read_rows(self, path: Path) -> Iterator[dict]:
        return read_jsonl(path)

    def repair(self, path: Path) -> int:
        return repair_tail(path)

    def rewrite(self, path: Path, update: Callable[[dict], bool]) -> int:
        return rewrite_rows(path, update) if path.exists() else 0

    def clear(self, path: Path) -> None:
        if path.exists():
            path.write_text("")

    def exists(self, path: Path) -> bool:
        return path.exists()

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text())

    def write_json(self, path: Path, obj: Any) -> None:
        atomic_write_json(path, obj)

    def glob(self, folder: Path, pattern: str) -> list[Path]:
        return sorted(folder.glob(pattern))

    def lock(self, path: Path, what: str) -> ShardLock:
        return ShardLock(path, what)


class ObjectDir:
    """An fsspec output location: every logical ``X.jsonl`` is a folder ``X/`` of part files."""

    def __init__(self, fs, root: str, url: str) -> None:
        self.fs, self.root, self.url = fs, root, url
        fs.invalidate_cache()  # listings cached by an earlier run in this process may be stale
        self.run_tag = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"  # part names of this run

    def __str__(self) -> str:
        return self.url

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    @staticmethod
    def _parts(path: str) -> str:
        return path[: -len(".jsonl")] if path.endswith(".jsonl") else path

    def _part_files(self, path: str) -> list[str]:
        return sorted(self.fs.glob(f"{self._parts(path)}/part-*.jsonl"))

    def appender(self, path: str) -> "PartWriter":
        return PartWriter(self.fs, self._parts(path), self.run_tag)

    def read_rows(self, path: str) -> Iterator[dict]:
        parts = self._part_files(path)
        for first in range(0, len(parts), PARTS_PER_FETCH):
            group = parts[first : first + PARTS_PER_FETCH]
            data = self.fs.cat(group) if len(group) > 1 else {group[0]: self.fs.cat_file(group[0])}
            for part in group:
                for lineno, line in enumerate(data[part].decode("utf-8").splitlines(), 1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            raise ValueError(f"{part}:{lineno}: corrupt line in a generation part "
                                             "(fix: delete that part; the next run regenerates it)") from None

    def repair(self, path: str) -> int:
        return 0  # parts are written whole

    def rewrite(self, path: str, update: Callable[[dict], bool]) -> int:
        changed = 0
        for part in self._part_files(path):
            rows = [json.loads(x) for x in self.fs.cat_file(part).decode("utf-8").splitlines() if x.strip()]
            n = sum(bool(update(r)) for r in rows)
            if n:
                self.fs.pipe_file(part, _jsonl(rows))  # one PUT replaces the part whole
                changed += n
        return changed

    def clear(self, path: str) -> None:
        for part in self._part_files(path):
            self.fs.rm_file(part)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_json(self, path: str) -> Any:
        return json.loads(self.fs.cat_file(path))

    def write_json(self, path: str, obj: Any) -> None:
        self.fs.pipe_file(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))

    def glob(self, folder: str, pattern: str) -> list[str]:
        return sorted(self.fs.glob(f"{folder}/{pattern}"))

    def lock(self, path: str, what: str) -> "LeaseLock":
        return LeaseLock(self.fs, path, what)


class PartWriter:
    """The Appender of an ObjectDir: each write is one new part file, written in one PUT."""

    def __init__(self, fs, folder: str, run_tag: str) -> None:
        self.fs, self.folder, self.run_tag = fs, folder, run_tag
        self.seq = 0

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.seq += 1
        self.fs.pipe_file(f"{self.folder}/part-{self.run_tag}-{self.seq:06d}.jsonl", _jsonl(rows))

    def close(self) -> None:
        pass


# A shard's lease on object storage: how long it holds without renewal (a killed run's shard is
# free again after this), renewed every third of it while the run writes.
LEASE_SECONDS = 600.0


class LeaseLock:
    """An exclusive lease on a shard in object storage (fsspec): the ShardLock of an ObjectDir.

    ``acquire`` creates the lock object with an exclusive PUT (fsspec mode ``"xb"``: S3's
    ``If-None-Match: *``), holding the holder's name, a random token and an expiry; a background
    thread renews the expiry every third of the lease; ``release`` stops it and deletes the object
    if it is still this run's. A fresh lease held by another run is :class:`ShardBusy` (one line).
    An expired one (its run was killed) is deleted and taken over; two runs taking over the same
    expired lease at the same moment can both succeed, since object stores have no conditional
    delete — the window is one round trip, once per killed run.
    """

    def __init__(self, fs, path: str, what: str, lease: float | None = None) -> None:
        self.fs, self.path, self.what = fs, path, what
        self.lease = float(LEASE_SECONDS if lease is None else lease)
        self.token = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"holder": self.holder, "token": self.token, "since": now,
                           "expires": now + self.lease}).encode("utf-8")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treated as expired

    def acquire(self) -> None:
        for attempt in range(2):
            try:
                with self.fs.open(self.path, "xb") as f:
                    f.write(self._body())
                break
            except FileExistsError:
                held = self._read()
                if held is None:
                    continue  # released meanwhile
                expires = float(held.get("expires", 0))
                if expires > time.time() or attempt:
                    until = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(expires))
                    raise ShardBusy(f"{self.what} is being written by {held.get('holder', 'another run')} (lease until "
                                    f"{until}) (fix: wait for that run to end, or give this one another --out or "
                                    f"--shard; a killed run's lease expires {self.lease:.0f} s after its last renewal)") from None
                get_logger("megadoc_pl.synth").warning(
                    f"{self.what}: taking over the expired lease of {held.get('holder', 'a killed run')}")
                self.fs.rm_file(self.path)
            except (NotImplementedError, ValueError) as e:  # a protocol without exclusive create
                raise ValueError(f"{self.path}: this object store cannot create a lock object exclusively ({e}) "
                                 "(fix: write to a local directory or to S3 / memory://)") from None
        else:
            raise ShardBusy(f"{self.what}: the lock object changed while it was being taken (fix: run again)")
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name="shard-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                held = self._read()
                if not held or held.get("token") != self.token:
                    get_logger("megadoc_pl.synth").error(
                        f"{self.what}: this run's lease was taken over by {(held or {}).get('holder', 'nobody')} "
                        "(a renewal came later than the lease): two runs may now write this shard")
                    return
                self.fs.pipe_file(self.path, self._body())
            except Exception as e:  # a failed renewal is retried at the next tick
                get_logger("megadoc_pl.synth").warning(f"{self.what}: lease renewal failed ({e}); retrying")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            self.held = False
            held = self._read()
            if held and held.get("token") == self.token:
                self.fs.rm_file(self.path)

    def discard(self) -> None:
        self.release()


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
