"""Checkpoint files that are never torn, never non-finite, and checked before a resume.

- :class:`AtomicCheckpointIO` is the Trainer's CheckpointIO: a checkpoint is written to a
  temporary file in its own directory (never ``$TMPDIR``: a rename across filesystems is a
  copy), fsynced, then renamed over the old one, so ``last.ckpt`` is always a whole file. Weights
  with a NaN/inf are not saved (the previous checkpoint stays ``last``); a failed write (full
  disk, read-only directory) is one line naming the file.
- :func:`resume_from` is what a resume reads first: the requested checkpoint if its content
  checks out (zip CRCs, loadable, finite weights), else the newest intact ``step-*.ckpt`` beside
  it, with one line saying so.
- :func:`check_compatible` refuses a checkpoint whose weights do not fit this run's model
  (another tokenizer's vocabulary, another size) or whose dataset fingerprint differs, before
  the run writes anything.
- :func:`remove_leftovers` deletes the temporary files of a save that was killed.
"""

from __future__ import annotations

import errno
import re
import zipfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from megadoc_pl.utils import atomic_open, get_logger

TMP_SUFFIX = ".ckpt-tmp"
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)  # a filesystem that cannot take the run
_STEP = re.compile(r"step-(\d+)\.ckpt$")
_log = get_logger("train")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or resumed from; ``str(e)`` is one line with the fix."""


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding a NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def write_checkpoint(checkpoint: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` streamed through a temporary file in ``path``'s directory (utils.atomic_open)."""
    with atomic_open(path, suffix=TMP_SUFFIX) as f:
        torch.save(checkpoint, f)


def _os_error(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError an exception is, or was raised while handling."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


SHARDED_META = "meta.pt"  # what Lightning writes beside the shards: everything but weights and optimizer state


def sharded_shapes(path: Path) -> dict[str, tuple]:
    """``state_dict`` key -> global shape of the tensors in a sharded (torch.distributed.checkpoint) checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len("state_dict."):]: tuple(v.size) for k, v in meta.items()
            if k.startswith("state_dict.") and hasattr(v, "size")}


def _sharded_problem(path: Path) -> tuple[Optional[str], Optional[dict]]:
    if not (path / ".metadata").is_file() or not (path / SHARDED_META).is_file():
        return "is a directory but not a complete sharded checkpoint (no .metadata or meta.pt)", None
    try:
        ckpt = torch.load(path / SHARDED_META, map_location="cpu", weights_only=False)
        shapes = sharded_shapes(path)
    except Exception as e:
        return f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", None
    if not shapes:
        return "holds no weights (empty sharded checkpoint)", None
    return None, {**ckpt, "sharded_shapes": shapes}


def checkpoint_problem(path: Path) -> tuple[Optional[str], Optional[dict]]:
    """(None, checkpoint) for an intact checkpoint, else (what is wrong with it, None).

    A sharded checkpoint (a directory) is checked for its metadata and the shapes it records; its
    returned dict holds Lightning's metadata and ``sharded_shapes`` instead of the weights (they
    never hold NaN/inf: the strategy refuses to write such shards).
    """
    if path.is_dir():
        return _sharded_problem(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e.strerror})", None
    if size == 0:
        return "is empty (0 bytes)", None
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return f"is truncated or not a checkpoint ({size} bytes; {e})", None
    if bad is not None:
        return f"is corrupt (its member {bad} fails the CRC check)", None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        return f"cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        return "is not a Lightning checkpoint (no state_dict)", None
    bad_tensors = nonfinite_tensors(ckpt["state_dict"])
    if bad_tensors:
        return f"holds {len(bad_tensors)} weight tensors with NaN/inf (e.g. {bad_tensors[0]})", None
    return None, ckpt


def _step_checkpoints(directory: Path) -> list[Path]:
    """``step-*.ckpt`` files of a directory, newest step first."""
    found = [(int(m.group(1)), p) for p in directory.glob("step-*.ckpt") if (m := _STEP.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resume_from(path: Path, fallback: bool) -> tuple[Path, dict]:
    """The checkpoint to resume from and its content: ``path`` if intact, else (``fallback``) the
    newest intact ``step-*.ckpt`` in its directory, with a warning; otherwise a one-line error."""
    problem, ckpt = checkpoint_problem(path)
    if problem is None:
        return path, ckpt
    if fallback:
        for other in _step_checkpoints(path.parent):
            if other == path:
                continue
            other_problem, ckpt = checkpoint_problem(other)
            if other_problem is None:
                _log.warning(f"{path} {problem}; resuming from {other.name}, the newest intact checkpoint")
                return other, ckpt
    raise CheckpointError(
        f"cannot resume: {path} {problem}"
        + (" and no intact step-*.ckpt is beside it" if fallback else "")
        + " (fix: give run.resume=PATH of an intact checkpoint, or start a new run with another run.name)"
    )


def check_compatible(ckpt: Mapping[str, Any], module: torch.nn.Module, datamodule: Any, path: Path) -> None:
    """Refuse, in one line, a checkpoint whose weights or dataset do not belong to this run."""
    ours = module.state_dict()
    theirs = ckpt["sharded_shapes"] if "sharded_shapes" in ckpt else {k: v.shape for k, v in ckpt["state_dict"].items()}
    fix = "(fix: resume with the recipe, tokenizer and data the checkpoint was trained with, or start a new run)"
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        raise CheckpointError(f"cannot resume from {path}: its weights do not match this model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]}) {fix}")
    for name, tensor in ours.items():
        if tuple(theirs[name]) != tuple(tensor.shape):
            raise CheckpointError(
                f"cannot resume from {path}: {name} is {tuple(theirs[name])} in the checkpoint but "
                f"{tuple(tensor.shape)} in this run (another tokenizer vocabulary or model size) {fix}")
    state = ckpt.get(type(datamodule).__qualname__)
    if state is not None and hasattr(datamodule, "load_state_dict"):
        datamodule.load_state_dict(state)  # refuses another dataset fingerprint (Lightning restores it again)


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temporary files of interrupted saves in ``directory`` (the caller owns it):
    checkpoints (``.NAME.XXXX.ckpt-tmp``) and small atomic writes (``.NAME.XXXX.tmp``, utils)."""
    removed = sorted(directory.glob(f".*{TMP_SUFFIX}")) + sorted(directory.glob(".*.tmp"))
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
