"""The run directory (docs/training.md, "Run directory"): where a run lives, what it records, how it is resumed.

Layout of ``<run.root>/<run.name>/``::

    config.yaml          the resolved recipe (OmegaConf), enough to rerun the run
    provenance.json      git revision, library versions, host, launch command, seeds
    tokenizer/           a copy of the tokenizer the run trains with (what export and evaluation read)
    events.out.tfevents.*  TensorBoard scalars/images (TensorBoardLogger, no version folders)
    checkpoints/
      last.ckpt          the newest checkpoint with finite weights (what ``run.resume=last`` picks up)
      step-000123.ckpt   periodic checkpoints every ``train.ckpt_every`` steps
    metrics.json         flat final metrics, written atomically at the end (also on failure)
    .lock                flock held by the live run (its pid inside); dies with the process

Only the global rank 0 writes files here; every rank agrees on the directory name (see
:func:`resolve_run_dir`). Rank 0 claims the directory (:func:`claim_run_dir`) before any data
work; checkpoints are written by ``train.checkpoint_io.AtomicCheckpointIO`` (same-directory
temporary file, fsync, rename).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from megadoc_pl.errors import BadInput
from megadoc_pl.train.checkpoint import remove_leftovers
from megadoc_pl.utils import atomic_dir, atomic_write_json, atomic_write_text, current_umask, get_logger

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
PROVENANCE_FILE = "provenance.json"
TOKENIZER_DIR = "tokenizer"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
LOCK_FILE = ".lock"

# Set by the first process of a launch so that ranks Lightning starts later (its subprocess
# launcher re-runs the command with the parent's environment) use the same directory.
RUN_DIR_ENV = "MEGADOC_RUN_DIR"

_LIBRARIES = ("megadoc_pl", "torch", "lightning", "numpy", "omegaconf", "tokenizers", "transformers",
              "torchmetrics", "tensorboard")
_log = get_logger("train")


def default_run_name(recipe: str, scale: str, stamp: Optional[str] = None) -> str:
    """``<recipe>-<scale>-<YYYYmmdd-HHMMSS>``."""
    stamp = stamp or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{recipe}-{scale}-{stamp}"


def _launch_id() -> Optional[str]:
    """An id every rank of a multi-process launch sees the same (None for a single process)."""
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not multi:
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"job{job}"
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if rdzv and rdzv != "none":
        return f"rdzv{re.sub(r'[^A-Za-z0-9_.-]', '', rdzv)[:24]}"
    raise BadInput(
        "this is a multi-process launch without a shared run id (fix: set run.name=NAME, or export "
        "MEGADOC_RUN_DIR, or launch torchrun with --rdzv-id, so all ranks use one run directory)"
    )


def resolve_run_dir(cfg: DictConfig) -> Path:
    """The run directory of ``cfg`` (not created): explicit name, inherited env, resumed or new.

    - ``run.name`` set: ``<root>/<name>``.
    - ``$MEGADOC_RUN_DIR`` set (a process started by another rank of this launch): that.
    - ``run.resume`` = ``last``/``auto`` without a name: the newest ``<recipe>-<scale>-*``
      directory under root that holds ``checkpoints/last.ckpt`` (``last``: one must exist).
    - otherwise a new ``<recipe>-<scale>-<timestamp>`` (or ``-job<SLURM id>`` /
      ``-rdzv<id>`` for multi-process launches, so every rank derives the same name); a taken
      timestamp name gets ``-2``, ``-3``... when :func:`claim_run_dir` creates it.
    """
    root = Path(cfg.run.root)
    if cfg.run.name:
        return root / str(cfg.run.name)
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    if cfg.run.resume in ("last", "auto"):
        found = latest_run_with_checkpoint(root, f"{cfg.recipe}-{cfg.scale}-")
        if found is not None:
            return found
        if cfg.run.resume == "last":
            raise BadInput(
                f"run.resume=last but no run '{cfg.recipe}-{cfg.scale}-*' under {root}/ has "
                f"{CKPT_DIR}/{LAST_CKPT} (fix: give run.name=NAME of the run to resume, or use run.resume=auto)"
            )
    return root / default_run_name(cfg.recipe, cfg.scale, _launch_id())


def is_generated_name(cfg: DictConfig) -> bool:
    """True when the run directory's name is a fresh timestamp, which :func:`claim_run_dir` may suffix."""
    return not cfg.run.name and not os.environ.get(RUN_DIR_ENV) and _launch_id() is None


@dataclass
class RunClaim:
    """This process owns ``path``: it holds the exclusive lock on ``path/.lock`` until :meth:`release`."""

    path: Path
    created: bool  # the directory did not exist before this claim
    _fd: Optional[int] = None

    def release(self, remove_if_unused: bool = False) -> None:
        """Drop the lock; ``remove_if_unused``: delete a directory this claim made and nothing wrote into."""
        if self._fd is None:
            return
        if remove_if_unused and self.created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.rmdir()
        os.close(self._fd)
        self._fd = None


def claim_run_dir(path: Path, unique: bool) -> RunClaim:
    """Create (or open) the run directory and lock it, before any other work of the run.

    ``unique`` (a generated name): ``os.mkdir`` is the atomic claim, so two runs started in the
    same second get ``NAME`` and ``NAME-2``. Otherwise the directory may exist (a resume, a named
    run, every rank of a launch); the lock refuses a second live run in it. The lock dies with its
    process (flock), so a killed run leaves nothing to clean up by hand; its temporary files are
    removed here.
    """
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        base, n = path, 2
        while True:
            try:
                os.mkdir(path)
                created = True
                break
            except FileExistsError:
                if not unique:
                    created = False
                    break
                path, n = base.with_name(f"{base.name}-{n}"), n + 1
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    except OSError as e:
        raise BadInput(f"cannot create the run directory {path}: {e.strerror or e} "
                       "(fix: make run.root writable, free space on it, or set run.root=DIR)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise BadInput(f"{path} is in use by another run (pid {holder}) (fix: wait for it to end, "
                       "or pick another run.name)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    for leftover in remove_leftovers(path / CKPT_DIR) + remove_leftovers(path):
        _log.info(f"removed {leftover}, left by an interrupted save")
    claim = RunClaim(path, created, fd)
    atexit.register(claim.release, remove_if_unused=True)  # a start that never got to fit leaves no directory
    return claim


def latest_run_with_checkpoint(root: Path, prefix: str) -> Optional[Path]:
    """The most recently modified ``root/<prefix>*`` directory with a last checkpoint."""
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix) and (p / CKPT_DIR / LAST_CKPT).exists()]
    if not runs:
        return None
    return max(runs, key=lambda p: (p / CKPT_DIR / LAST_CKPT).stat().st_mtime)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Optional[Path]:
    """The checkpoint ``run.resume`` asks for: None, ``last`` (must exist), ``auto`` (if any), or a path."""
    resume = cfg.run.resume
    if resume in (None, "", "none", False):
        return None
    last = run_dir / CKPT_DIR / LAST_CKPT
    if resume in ("last", "auto"):
        if last.exists():  # a file, or a directory of shards (train.sharded_checkpoints)
            return last
        if resume == "auto":
            return None
        raise BadInput(
            f"run.resume=last but {last} does not exist (fix: check run.name/run.root, or use run.resume=auto "
            "to start fresh when there is nothing to resume)"
        )
    path = Path(str(resume))
    if not path.exists():
        raise BadInput(f"run.resume={resume}: no such checkpoint file (fix: give 'last', 'auto' or a .ckpt path)")
    return path


def save_config(run_dir: Path, cfg: DictConfig) -> Path:
    """Write the resolved recipe as ``config.yaml`` (atomic), each key's documentation as a comment."""
    from megadoc_pl.config import commented_yaml

    path = run_dir / CONFIG_FILE
    atomic_write_text(path, commented_yaml(cfg))
    return path


def git_revision(path: Optional[Path] = None) -> dict:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding the package, or ``{}``."""
    where = path or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": sha, "dirty": bool(status.strip())}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """What makes a run reproducible beyond its config: code revision, libraries, seeds, host."""
    return {
        "git": git_revision(),
        "versions": library_versions(),
        "seeds": {"seed": int(cfg.train.seed), "data_seed": int(cfg.train.data_seed)},
        "host": socket.gethostname(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def save_provenance(run_dir: Path, info: Mapping[str, Any]) -> None:
    atomic_write_json(run_dir / PROVENANCE_FILE, dict(info))


def save_tokenizer(run_dir: Path, tokenizer: str | os.PathLike) -> Path:
    """Copy the tokenizer the run trains with (the resolved one: ``data.tokenizer`` or the demo's)
    into ``run_dir/tokenizer/``: its ``tokenizer.json`` and the files beside it that name the
    special tokens, so it loads with the same BOS/EOS. Export and evaluation read it from there."""
    from megadoc_pl.data.tokenizer import load_tokenizer

    src = Path(tokenizer)
    info = load_tokenizer(src)  # a transformers directory without tokenizer.json gets one here
    beside = src if src.is_dir() else src.parent
    with atomic_dir(run_dir / TOKENIZER_DIR, overwrite=True) as tmp:
        (tmp / "tokenizer.json").write_text(info.json_str, encoding="utf-8")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if (beside / name).is_file():
                shutil.copyfile(beside / name, tmp / name)
    return run_dir / TOKENIZER_DIR


def save_metrics(run_dir: Path, metrics: Mapping[str, Any]) -> Path:
    """Write the flat ``metrics.json`` (atomic: readers never see half a file)."""
    path = run_dir / METRICS_FILE
    atomic_write_json(path, dict(metrics))
    return path


def flat_provenance(info: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance as flat metrics.json keys (``git_revision``, ``version/torch``, ``seed``...)."""
    out: dict[str, Any] = {}
    git = info.get("git") or {}
    out["git_revision"] = git.get("commit")
    out["git_dirty"] = git.get("dirty")
    for lib, v in (info.get("versions") or {}).items():
        out[f"version/{lib}"] = v
    for k, v in (info.get("seeds") or {}).items():
        out[k] = v
    return out
