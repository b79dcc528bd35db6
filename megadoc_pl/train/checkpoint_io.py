"""Lightning's CheckpointIO for this package: atomic writes, finite weights only.

Kept apart from train/checkpoint.py so that reading checkpoints (megadoc_pl.checkpoints, the
tools) does not import Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import TorchCheckpointIO

from megadoc_pl.train.checkpoint import CheckpointError, _log, _os_error, nonfinite_tensors, write_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: same-directory temporary file + fsync + rename; finite weights only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        bad = nonfinite_tensors(checkpoint.get("state_dict") or {})
        if bad:
            _log.warning(f"not saving {path}: {len(bad)} weight tensors hold NaN/inf (e.g. {bad[0]}); "
                         "the previous checkpoint stays")
            return
        try:
            write_checkpoint(checkpoint, path)
        except (OSError, RuntimeError) as e:
            cause = _os_error(e)  # torch's zip writer reports a failed write as a RuntimeError
            if cause is None:
                raise
            raise CheckpointError(
                f"cannot write checkpoint {path}: {cause.strerror or cause} (fix: free space on that filesystem or "
                "make it writable, or set run.root to one that is; earlier checkpoints are intact)"
            ) from None
