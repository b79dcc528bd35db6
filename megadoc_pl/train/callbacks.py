"""Training bookkeeping: per-stream token counts, non-finite loss reports, throughput and MFU.

- :class:`StreamCounter` counts the windows (and so tokens) each stream has contributed, from
  the global window indices of the batches and the mixture plan's drawing rule. Its totals are
  global (summed over ranks every optimizer step) and travel in the checkpoint, so a resumed run
  continues the same counts.
- :class:`NonFiniteLossError` is what a NaN/inf training loss raises: one line with the step,
  the rank, the offending windows and their streams/sources.
- :class:`ThroughputMonitor` logs ``train/tokens_per_s`` and, on a GPU with a known peak,
  ``train/mfu`` (model FLOPs including attention, over the peak of all devices).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import numpy as np


class StreamCounter:
    """Windows seen per stream, and the tokens and passes they make.

    Args:
        names: stream names, in the order ``locate`` numbers them.
        pass_tokens: unique tokens in one pass over each stream (for passes = tokens / pass).
        locate: global window indices -> stream numbers (the mixture plan's drawer).
    """

    def __init__(self, names: Sequence[str], pass_tokens: Mapping[str, int],
                 locate: Callable[[np.ndarray], np.ndarray]) -> None:
        self.names = list(names)
        self.pass_tokens = {n: int(pass_tokens.get(n, 0)) for n in self.names}
        self._locate = locate
        self.tokens = np.zeros(len(self.names), dtype=np.int64)  # global totals
        self.pending = np.zeros(len(self.names), dtype=np.int64)  # this rank, current step

    def add_batch(self, window_index: np.ndarray, tokens_per_window: int) -> None:
        """Count one (micro-)batch of this rank; it joins the totals at :meth:`commit`."""
        streams = np.asarray(self._locate(np.asarray(window_index, dtype=np.int64)), dtype=np.int64)
        self.pending += np.bincount(streams, minlength=len(self.names)) * int(tokens_per_window)

    def take_pending(self) -> np.ndarray:
        out, self.pending = self.pending, np.zeros_like(self.pending)
        return out

    def commit(self, global_step_tokens: np.ndarray) -> None:
        """Add one step's tokens, already summed over ranks."""
        self.tokens += np.asarray(global_step_tokens, dtype=np.int64)

    def metrics(self) -> dict[str, float]:
        """``train/tokens``, ``train/tokens/<stream>`` and ``train/passes/<stream>``."""
        out: dict[str, float] = {"train/tokens": int(self.tokens.sum())}
        for n, t in zip(self.names, self.tokens):
            out[f"train/tokens/{n}"] = int(t)
            if self.pass_tokens[n]:
                out[f"train/passes/{n}"] = float(t) / self.pass_tokens[n]
        return out

    def state_dict(self) -> dict:
        return {"names": list(self.names), "tokens": [int(t) for t in self.tokens]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(
                f"checkpoint counts streams {list(state['names'])} but this run has {self.names}; "
                "resume with the recipe the checkpoint was trained with"
            )
        self.tokens = np.asarray(state["tokens"], dtype=np.int64)
        self.pending = np.zeros_like(self.tokens)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names step, rank, windows and sources."""


def nonfinite_message(
    step: int,
    rank: int,
    loss: float,
    bad_windows: Sequence[int],
    describe: Optional[Callable[[Sequence[int]], Sequence[str]]] = None,
    max_shown: int = 8,
) -> str:
    """One line for :class:`NonFiniteLossError`; ``describe`` turns window indices into sources."""
    where = f"optimizer step {step + 1} (global_step={step})"
    if not bad_windows:
        return (
            f"non-finite training loss ({loss}) at {where}: the non-finite micro-batch was on another rank "
            f"(this is rank {rank}); see that rank's message. Fix: lower train.lr, raise train.warmup_fraction, "
            "or check those windows with tools/dump_windows.py"
        )
    shown = list(bad_windows)[:max_shown]
    more = f" (+{len(bad_windows) - len(shown)} more)" if len(bad_windows) > len(shown) else ""
    parts = [f"non-finite training loss ({loss}) at {where} on rank {rank}: windows {shown}{more}"]
    if describe is not None:
        try:
            parts.append("sources: " + "; ".join(str(s) for s in describe(shown)))
        except Exception as e:  # describing must never hide the real error
            parts.append(f"(sources unavailable: {e})")
    parts.append("fix: lower train.lr, raise train.warmup_fraction, or inspect the windows with tools/dump_windows.py")
    return " | ".join(parts)


class ThroughputMonitor(pl.Callback):
    """Tokens per second averaged over the last ``window`` optimizer steps, and MFU where defined.

    Logged after every optimizer step (the logger writes every ``train.log_every`` steps). The
    first step (compilation, allocator warm-up) is never timed. Throughput counts the tokens of
    all ranks (``tokens_per_step`` = global batch x seq_len). MFU = achieved model FLOPs / peak
    of all devices, with FLOPs per token from ``flops_fn(mean_attended_keys)``: the mean keys per
    query come from the batches' segments (``pl_module.take_attention_stats()``), so document and
    megadoc scopes are not charged for attention they skip. Without a peak (CPU, unknown GPU,
    non-bf16 precision) no MFU is logged. ``clock`` (seconds) is injectable for tests.
    """

    def __init__(
        self,
        tokens_per_step: int,
        flops_fn: Optional[Callable[[Optional[float]], float]] = None,
        peak_flops_per_device: Optional[float] = None,
        window: int = 10,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.tokens_per_step = int(tokens_per_step)
        self.flops_fn = flops_fn
        self.peak_flops_per_device = peak_flops_per_device
        self.window = max(1, int(window))
        self.clock = clock
        self._seen_step = -1
        self._times: deque[float] = deque(maxlen=self.window + 1)
        self._attn: deque[tuple[int, int]] = deque(maxlen=self.window)  # (causal pairs, tokens) per step
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        self._times.clear()
        self._attn.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._seen_step:  # still accumulating gradients
            return
        self._seen_step = trainer.global_step
        self._times.append(self.clock())
        take = getattr(pl_module, "take_attention_stats", None)
        if callable(take):
            self._attn.append(take())
        if len(self._times) < 2:
            return
        steps = len(self._times) - 1
        dt = self._times[-1] - self._times[0]
        tokens_per_s = steps * self.tokens_per_step / dt
        self.last = {"train/tokens_per_s": tokens_per_s, "train/step_time_s": dt / steps}
        if self.flops_fn is not None:
            pairs, toks = (sum(x) for x in zip(*self._attn)) if self._attn else (0, 0)
            flops = self.flops_fn(pairs / toks if toks else None)
            self.last["train/flops_per_token"] = flops
            if self.peak_flops_per_device:
                self.last["train/mfu"] = flops * tokens_per_s / (self.peak_flops_per_device * trainer.world_size)
        for k, v in self.last.items():
            pl_module.log(k, v, on_step=True, on_epoch=False)
