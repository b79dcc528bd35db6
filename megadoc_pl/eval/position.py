"""Loss by position: bucketing, curves, CSV files and plots.

Two curves per validation set (docs/evaluation.md, the long-context curve):

- ``window``: position of the predicting token inside the training window, ``0 .. seq_len-1``,
  cut into ``n`` equal buckets (``bucket = t * n // seq_len``). Shows how much the model gains
  from the context the window gives it.
- ``document``: position inside the token's own document (``batch['doc_positions']``, counted
  from the document's first token even when the document began in an earlier window), in
  **log2** buckets: ``{0}, [1, 2), [2, 4), [4, 8), ...``; the last bucket is open-ended. Log2
  because document lengths span orders of magnitude: linear buckets sized for a 30k-token
  document would put all of a short document into bucket 0.

A curve is a pair of exact accumulators per bucket (loss sum, token count), so curves from many
batches and ranks add up, and the count-weighted mean of a curve is the set's loss.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megadoc_pl.utils import atomic_write_text

CSV_COLUMNS = ("kind", "bucket_start", "bucket_end", "count", "mean_loss")


# ---------------------------------------------------------------------------------- buckets


def window_bucket_index(positions: torch.Tensor, seq_len: int, num_buckets: int) -> torch.Tensor:
    """Bucket of each window position ``0 <= t < seq_len`` among ``num_buckets`` equal buckets."""
    return (positions * num_buckets).div(seq_len, rounding_mode="floor")


def window_bucket_edges(seq_len: int, num_buckets: int) -> list[tuple[int, int]]:
    """[start, end) of each window bucket: the positions t with ``t * n // seq_len == b``."""
    starts = [-((-b * seq_len) // num_buckets) for b in range(num_buckets)]  # ceil(b * T / n)
    return list(zip(starts, starts[1:] + [seq_len]))


def doc_bucket_index(positions: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log2 bucket of each document position: 0 -> 0, [2^(k-1), 2^k) -> k, clamped to n-1."""
    # frexp(p) = m * 2^e with m in [0.5, 1): floor(log2 p) = e - 1, exact for integers < 2^53.
    _, exp = torch.frexp(positions.to(torch.float64).clamp(min=1.0))
    bucket = torch.where(positions > 0, exp.to(torch.int64), torch.zeros_like(exp, dtype=torch.int64))
    return bucket.clamp(max=num_buckets - 1)


def doc_bucket_edges(num_buckets: int) -> list[tuple[int, float]]:
    """[start, end) of each document bucket; the last one ends at infinity."""
    edges: list[tuple[int, float]] = [(0, 1)]
    edges += [(2 ** (k - 1), 2**k) for k in range(1, num_buckets)]
    edges[-1] = (edges[-1][0], math.inf)
    return edges


# ---------------------------------------------------------------------------------- curves


@dataclass
class Curve:
    """Loss sums and token counts per position bucket of one set (already summed over ranks)."""

    kind: str  # 'window' or 'document'
    edges: list[tuple[int, float]]  # [start, end) per bucket
    sums: np.ndarray  # float64 (n,) summed token loss per bucket
    counts: np.ndarray  # int64 (n,) tokens per bucket

    @property
    def mean(self) -> np.ndarray:
        """Mean loss per bucket (nan where the bucket saw no token)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)

    def rows(self, trim: bool = True) -> list[dict]:
        """CSV rows; ``trim`` drops the empty buckets after the last non-empty one."""
        n = len(self.counts)
        if trim:
            nonzero = np.flatnonzero(self.counts)
            n = int(nonzero[-1]) + 1 if len(nonzero) else 0
        mean = self.mean
        return [
            {
                "kind": self.kind,
                "bucket_start": int(self.edges[b][0]),
                "bucket_end": self.edges[b][1] if math.isinf(self.edges[b][1]) else int(self.edges[b][1]),
                "count": int(self.counts[b]),
                "mean_loss": float(mean[b]),
            }
            for b in range(n)
        ]


def curves_to_csv(curves: list[Curve]) -> str:
    """CSV text with columns kind, bucket_start, bucket_end, count, mean_loss."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for curve in curves:
        for row in curve.rows():
            row = dict(row, mean_loss="nan" if math.isnan(row["mean_loss"]) else repr(row["mean_loss"]))
            writer.writerow(row)
    return buf.getvalue()


def write_curves_csv(path: str | Path, curves: list[Curve]) -> None:
    atomic_write_text(path, curves_to_csv(curves))


def read_curves_csv(path: str | Path) -> list[dict]:
    """The rows of a ``loss_by_position_<name>.csv`` file, numbers parsed."""
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {
                "kind": r["kind"],
                "bucket_start": int(r["bucket_start"]),
                "bucket_end": float(r["bucket_end"]),
                "count": int(r["count"]),
                "mean_loss": float(r["mean_loss"]),
            }
            for r in csv.DictReader(f)
        ]


def plot_curves(title: str, curves: list[Curve]):
    """A matplotlib Figure with one panel per curve (no pyplot state, safe in any backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(curves), 3.6), dpi=90)
    for i, curve in enumerate(curves):
        ax = fig.add_subplot(1, len(curves), i + 1)
        rows = [r for r in curve.rows() if r["count"] > 0]
        if curve.kind == "window":
            x = [(r["bucket_start"] + r["bucket_end"] - 1) / 2 for r in rows]
            ax.set_xlabel("position in window (bucket centre)")
        else:
            x = [r["bucket_start"] for r in rows]
            ax.set_xscale("symlog", base=2, linthresh=1)
            ax.set_xlabel("position in document (log2 bucket start)")
        ax.plot(x, [r["mean_loss"] for r in rows], marker=".")
        ax.set_ylabel("mean loss (nats)")
        ax.set_title(f"{title}: by {curve.kind} position", fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
