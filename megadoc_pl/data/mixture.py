"""Mixture plans and per-sequence stream drawing (docs/data-corpus.md; the megadocs paper's mixing rule).

Counting conventions, used everywhere in the package:

- A *window* carries ``seq_len + 1`` tokens. Consecutive windows of one stream overlap by one
  token (window j covers stream tokens ``[j*T, j*T + T + 1)``), so every stream token after the
  first is a training target exactly once and a window *consumes* ``T = seq_len`` tokens.
- A step is ``global_batch_size`` windows; tokens per step = ``global_batch_size * seq_len``.
- Paper mode (the megadocs code's rule, marin ``experiments/data_efficiency``)::

      steps_per_epoch = floor(T_real / (global_batch_size * seq_len))      # 777 in the paper
      steps           = floor(steps_per_epoch * E / (1 - w))                # exact rationals

  so one real "epoch" is ``steps_per_epoch`` batches (the paper's ``max_train_batches``), the
  real stream gets ``E * steps_per_epoch * global_batch_size`` windows whenever ``(1 - w)``
  divides evenly, and the synthetic stream fills the rest.
- Per-sequence drawing (two streams): window k is synthetic iff ``floor((k+1) w) > floor(k w)``,
  so after any prefix of n windows exactly ``floor(n w)`` are synthetic (within one window of
  ``n w``). More streams chain this rule (stream i against the rest, on the rest's sub-index),
  which keeps every stream within ``S - 1`` windows of its share. Window k's index inside its
  stream is a closed form, so any window is O(1) to locate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

REAL, SYNTHETIC = "real", "synthetic"
_MAX_DEN = 1_000_000  # fractions are rationals with denominators below this (0.75 -> 3/4)


def as_fraction(x: float | int | str | Fraction) -> Fraction:
    """A config number as an exact small rational (0.9 -> 9/10, not 0.9000000000000000222)."""
    return Fraction(str(x) if isinstance(x, float) else x).limit_denominator(_MAX_DEN)


@dataclass(frozen=True)
class StreamPlan:
    """What one stream contributes to a run."""

    name: str
    pass_tokens: int  # unique tokens in one pass over the stream's units
    units: int  # units in one pass
    windows: int  # windows drawn from the stream over the run
    share: Fraction  # target share of windows (the drawing rule's fraction)

    def tokens(self, seq_len: int) -> int:
        return self.windows * seq_len

    def passes(self, seq_len: int) -> float:
        return self.windows * seq_len / self.pass_tokens if self.pass_tokens else 0.0


@dataclass(frozen=True)
class MixturePlan:
    """The whole run in numbers: steps, windows and tokens, per stream."""

    mode: str
    seq_len: int
    global_batch_size: int
    steps: int
    streams: tuple[StreamPlan, ...]
    steps_per_epoch: int | None = None  # paper mode: batches in one real epoch

    @property
    def windows(self) -> int:
        return self.steps * self.global_batch_size

    @property
    def tokens(self) -> int:
        return self.windows * self.seq_len

    def stream(self, name: str) -> StreamPlan:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)

    def drawer(self) -> "StreamDrawer":
        return StreamDrawer([s.name for s in self.streams], [s.share for s in self.streams])

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "steps": self.steps,
            "steps_per_epoch": self.steps_per_epoch,
            "windows": self.windows,
            "tokens": self.tokens,
            "streams": {
                s.name: {
                    "unique_tokens_per_pass": s.pass_tokens,
                    "units_per_pass": s.units,
                    "windows": s.windows,
                    "tokens": s.tokens(self.seq_len),
                    "passes": round(s.passes(self.seq_len), 6),
                    "share": str(s.share),
                    "fraction_of_tokens": round(s.windows / self.windows, 6) if self.windows else 0.0,
                }
                for s in self.streams
            },
        }


class StreamDrawer:
    """Deterministic per-sequence assignment of global windows to streams.

    Stream i takes window m of the sub-sequence left over by streams 0..i-1 iff
    ``floor((m+1) g_i) > floor(m g_i)``, with ``g_i = share_i / (1 - share_0 - ... - share_{i-1})``;
    the last stream takes what is left. With two streams ``[synthetic, real]`` and shares
    ``[w, 1-w]`` this is exactly "window k is synthetic iff floor((k+1)w) > floor(kw)".
    """

    def __init__(self, names: Sequence[str], shares: Sequence[Fraction]):
        if len(names) != len(shares) or not names:
            raise ValueError("a drawer needs one share per stream")
        if sum(shares) != 1:
            raise ValueError(f"stream shares must sum to 1, got {sum(shares)}")
        self.names = list(names)
        self._levels: list[tuple[int, int]] = []  # (p, q): g_i = p / q for every stream but the last
        left = Fraction(1)
        for share in shares[:-1]:
            g = (share / left if left else Fraction(0)).limit_denominator(_MAX_DEN)
            self._levels.append((g.numerator, g.denominator))
            left -= share

    def locate(self, k: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
        """Global window indices -> (stream number, index inside that stream), vectorised."""
        m = np.atleast_1d(np.asarray(k, dtype=np.int64)).copy()
        stream = np.full(m.shape, len(self.names) - 1, dtype=np.int64)
        index = m.copy()
        pending = np.ones(m.shape, dtype=bool)
        for i, (p, q) in enumerate(self._levels):
            before = (m * p) // q  # windows of stream i among the first m of this level
            hit = pending & (((m + 1) * p) // q > before)
            stream[hit] = i
            index[hit] = before[hit]
            pending &= ~hit
            m = np.where(pending, m - before, m)
        index[pending] = m[pending]
        return stream, index

    def counts(self, n: int) -> list[int]:
        """Windows of each stream among the first n global windows (exact)."""
        out, m = [], int(n)
        for p, q in self._levels:
            c = (m * p) // q
            out.append(c)
            m -= c
        out.append(m)
        return out


def _check_geometry(global_batch_size: int, seq_len: int) -> int:
    if global_batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"train.global_batch_size ({global_batch_size}) and data.seq_len ({seq_len}) must be >= 1"
        )
    return global_batch_size * seq_len


def paper_plan(
    real_tokens: int,
    real_epochs: float,
    synthetic_fraction: float,
    global_batch_size: int,
    seq_len: int,
    synthetic_tokens: int | None = None,
    real_units: int = 0,
    synthetic_units: int = 0,
) -> MixturePlan:
    """Paper mode: E passes over the real stream, a fraction w of all windows synthetic."""
    w = as_fraction(synthetic_fraction)
    epochs = as_fraction(real_epochs)
    if not 0 <= w < 1:
        raise ValueError(
            f"data.mixture.synthetic_fraction must be in [0, 1), got {synthetic_fraction} "
            "(w = 1 would leave no real data; use w < 1)"
        )
    if epochs <= 0:
        raise ValueError(f"data.mixture.real_epochs must be > 0, got {real_epochs}")
    if w > 0 and not synthetic_tokens:
        raise ValueError(
            f"data.mixture.synthetic_fraction={synthetic_fraction} needs a synthetic stream, but "
            "the recipe has none (set data.view to rephrase/stitch/stretch/maga/maga_stitch, or w=0)"
        )
    batch_tokens = _check_geometry(global_batch_size, seq_len)
    steps_per_epoch = real_tokens // batch_tokens
    if steps_per_epoch < 1:
        raise ValueError(
            f"the real stream has {real_tokens} tokens, less than one global batch "
            f"({global_batch_size} x {seq_len} = {batch_tokens}): lower train.global_batch_size or data.seq_len"
        )
    steps = math.floor(steps_per_epoch * epochs / (1 - w))
    if w == 0:  # a real-only plan: no synthetic stream at all
        streams: tuple[StreamPlan, ...] = (
            StreamPlan(REAL, int(real_tokens), real_units, steps * global_batch_size, Fraction(1)),
        )
    else:
        drawer = StreamDrawer([SYNTHETIC, REAL], [w, 1 - w])
        syn_windows, real_windows = drawer.counts(steps * global_batch_size)
        streams = (
            StreamPlan(SYNTHETIC, int(synthetic_tokens or 0), synthetic_units, syn_windows, w),
            StreamPlan(REAL, int(real_tokens), real_units, real_windows, 1 - w),
        )
    return MixturePlan("paper", seq_len, global_batch_size, steps, streams, steps_per_epoch)


def budget_plan(
    stream_tokens: Mapping[str, int],
    global_batch_size: int,
    seq_len: int,
    budget_tokens: int | None = None,
    stream_epochs: Mapping[str, float] | None = None,
    stream_weights: Mapping[str, float] | None = None,
    stream_units: Mapping[str, int] | None = None,
) -> MixturePlan:
    """Budget mode (MAGA): a token budget; per stream either epochs over its unique tokens or a weight.

    Streams with epochs take ``epochs * unique_tokens``; weighted streams split what is left of
    the budget in proportion to their weights. Without a budget, the epochs alone define it
    (e.g. MGA-Expansion EntireSet: real x 2 + MGA x 2). steps = floor(budget / (batch * seq_len)).
    """
    epochs = dict(stream_epochs or {})
    weights = dict(stream_weights or {})
    names = list(stream_tokens)
    for key, table in (("stream_epochs", epochs), ("stream_weights", weights)):
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise ValueError(
                f"data.mixture.{key} names unknown stream(s) {unknown}; this recipe's streams are {names}"
            )
    both = sorted(set(epochs) & set(weights))
    if both:
        raise ValueError(f"data.mixture: stream(s) {both} have both epochs and a weight; give one")
    missing = [n for n in names if n not in epochs and n not in weights]
    if missing:
        raise ValueError(
            f"budget mode: give data.mixture.stream_epochs or stream_weights for stream(s) {missing}"
        )
    batch_tokens = _check_geometry(global_batch_size, seq_len)
    target: dict[str, Fraction] = {}
    for n, e in epochs.items():
        if as_fraction(e) < 0:
            raise ValueError(f"data.mixture.stream_epochs.{n} must be >= 0, got {e}")
        target[n] = as_fraction(e) * int(stream_tokens[n])
    fixed = sum(target.values(), Fraction(0))
    if budget_tokens is None:
        if weights:
            raise ValueError("budget mode with stream_weights needs data.mixture.budget_tokens")
        budget = fixed
    else:
        budget = Fraction(int(budget_tokens))
        if weights:
            rest = budget - fixed
            total_w = sum(as_fraction(v) for v in weights.values())
            if rest < 0 or total_w <= 0:
                raise ValueError(
                    f"budget mode: stream epochs take {int(fixed)} tokens, more than the budget "
                    f"{int(budget)}, or the weights sum to 0; raise budget_tokens or lower epochs"
                )
            for n, v in weights.items():
                target[n] = rest * as_fraction(v) / total_w
        elif abs(budget - fixed) > batch_tokens:
            raise ValueError(
                f"budget mode: stream epochs sum to {int(fixed)} tokens but budget_tokens is "
                f"{int(budget)}; drop budget_tokens (epochs define it) or make one stream weighted"
            )
    for n, t in target.items():
        if t > 0 and not stream_tokens[n]:
            raise ValueError(f"budget mode: stream '{n}' is empty but is asked for {int(t)} tokens")
    total = sum(target.values(), Fraction(0))
    steps = math.floor(budget / batch_tokens)
    if steps < 1 or total <= 0:
        raise ValueError(
            f"budget mode: the budget ({int(budget)} tokens) is less than one global batch "
            f"({batch_tokens} tokens)"
        )
    shares = [target[n] / total for n in names]
    drawer = StreamDrawer(names, shares)
    counts = drawer.counts(steps * global_batch_size)
    units = stream_units or {}
    streams = tuple(
        StreamPlan(n, int(stream_tokens[n]), int(units.get(n, 0)), c, s)
        for n, c, s in zip(names, counts, shares)
    )
    return MixturePlan("budget", seq_len, global_batch_size, steps, streams)
