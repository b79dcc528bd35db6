"""What a training run prints: the project's own lines, a progress bar counting steps, and the
final metrics as a table; third-party lines that tell a user nothing are silenced.

Silenced (and only these): Lightning's litlogger advertisement, its model summary (a FLOPs
column of zeros: it cannot trace a forward that takes a batch dict; :func:`model_line` gives
parameters and FLOPs per token instead), the deprecation of ``LeafSpec`` inside Lightning's own
``_pytree`` helper, "`weights_only` was not set" (the run saves full checkpoints on purpose), and
Lightning's advice against two of MegadocLM's deliberate choices (see quiet_third_party).
Every other warning still shows.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Mapping, Optional

from lightning.pytorch.callbacks import ProgressBar

_NOISE = ("litlogger", "`weights_only` was not set")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in _NOISE)


def quiet_third_party() -> None:
    """Silence the third-party lines listed in the module docstring (idempotent)."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*is deprecated.*")
    # MegadocLM reads window numbers and segment offsets before the device transfer on purpose (no
    # sync per micro-batch), and logs validation losses already summed over ranks (no sync_dist)
    warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer`.*")
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())


def step_progress_bar() -> Optional[ProgressBar]:
    """Lightning's rich bar labelled ``train``/``validate`` instead of "Epoch 0/-2" (runs are counted
    in steps, with unbounded epochs); None where ``rich`` is missing (Lightning's tqdm bar then
    says "Epoch 0", which is true)."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    if not _RICH_AVAILABLE:
        return None
    from lightning.pytorch.callbacks import RichProgressBar

    class StepProgressBar(RichProgressBar):
        def _get_train_description(self, current_epoch: int) -> str:
            return f"{'train':{len(self.validation_description)}}"

    return StepProgressBar()


def model_line(parameters: int, non_embedding: int, flops_per_token: float) -> str:
    """One line about the model instead of Lightning's summary table."""
    return (f"model: {_count(parameters)} parameters ({_count(non_embedding)} outside the embeddings), "
            f"{_count(flops_per_token)} training FLOPs per token at full attention")


SUMMARY_KEYS = ("steps", "tokens_seen", "train/loss", "train/tokens_per_s", "train/mfu", "total_time_s")


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """The headline of ``metrics.json`` as a two-column table: every validation and downstream
    value, then the training summary (:data:`SUMMARY_KEYS`); the rest stays in the file."""
    keys = sorted(k for k in metrics if k.startswith(("val/", "downstream/")))
    keys += [k for k in SUMMARY_KEYS if k in metrics]
    rows = [(k, metrics[k]) for k in keys if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
    if not rows:
        return ""
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':{width}}  value", f"{'-' * width}  {'-' * 10}"]
    lines += [f"{k:{width}}  {_value(v)}" for k, v in rows]
    return "\n".join(lines)


def _value(v: float) -> str:
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"
