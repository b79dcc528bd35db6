"""Data efficiency: how many real tokens the real-data-only baseline would need to match a loss.

Fit the baseline's data-scaling law L(D) = A / D^alpha + E over runs at several real-data
sizes D (the predecessor paper used 209.7M ... 1.68B tokens; docs/papers.md, megadocs 6.2), invert
it exactly, D_eff(L) = (A / (L - E))^(1/alpha), and report for each method its effective real
tokens and the multiplier D_eff(L_method) / D_real (the megadocs "1.48x" / "1.80x").

The predecessor divides by D_eff(L_baseline at D_real) instead of D_real; pass
``reference_loss`` for that definition. The two agree when the law passes through the
baseline's own point. Intervals come from the law's bootstrap replicates (each replicate law is
inverted at the method's loss); a replicate whose asymptote is at or above the loss gives
D_eff = inf, counted in ``n_unbounded``, so an upper bound may be inf.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

from megadoc_pl.analysis.fits import PowerLaw, PowerLawFit, bootstrap_power_law, json_number


def fit_data_law(tokens: Sequence[float], losses: Sequence[float], **bootstrap) -> PowerLawFit:
    """Fit L(D) = A / D^alpha + E to the baseline's (D, loss) points, with bootstrap intervals.

    Keyword arguments go to ``bootstrap_power_law`` (n_boot, level, method, seed).
    """
    return bootstrap_power_law(tokens, losses, **bootstrap)


def law_from_params(A: float, alpha: float, E: float) -> PowerLaw:
    """A data law given by its parameters (e.g. a published fit)."""
    for name, v in (("A", A), ("alpha", alpha), ("E", E)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"law parameter {name}={v} must be a finite number >= 0")
    return PowerLaw(A, alpha, E)


def law_through_point(alpha: float, E: float, tokens: float, loss: float) -> PowerLaw:
    """The law with exponent alpha and asymptote E that passes through (tokens, loss).

    For when only alpha and E are known (as for the megadocs baseline): A is pinned so that the
    law reproduces the baseline's own loss at its own data size.
    """
    if loss <= E:
        raise ValueError(f"anchor loss {loss} must be above the asymptote E={E}")
    return law_from_params((loss - E) * tokens**alpha, alpha, E)


def effective_tokens(law: PowerLaw, loss: float) -> float:
    """D_eff(loss) = (A / (loss - E))^(1/alpha): real tokens the baseline needs to reach ``loss``.

    ValueError ("below the asymptote") when loss <= E.
    """
    return law.inverse(loss)


@dataclass
class Efficiency:
    """One method's effective real tokens and multiplier, with bootstrap intervals (or NaN)."""

    name: str
    loss: float
    d_real: float
    d_eff: float
    multiplier: float
    d_eff_lo: float = math.nan
    d_eff_hi: float = math.nan
    multiplier_lo: float = math.nan
    multiplier_hi: float = math.nan
    level: float = math.nan
    n_replicates: int = 0
    n_unbounded: int = 0  # replicates whose asymptote is at or above the loss (D_eff = inf)

    def as_dict(self) -> dict:
        """JSON-ready: NaN (no interval) -> null, inf (unbounded) -> "inf"."""
        return {k: json_number(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _replicate_d_eff(reps: np.ndarray, loss: float) -> np.ndarray:
    """D_eff under each replicate law (R, 3) = (A, alpha, E); inf at or below the asymptote."""
    A, alpha, E = reps[:, 0], reps[:, 1], reps[:, 2]
    gap = loss - E
    out = np.full(len(reps), np.inf)
    ok = (gap > 0) & (A > 0) & (alpha > 0)
    with np.errstate(over="ignore", divide="ignore"):
        out[ok] = np.exp(np.log(A[ok] / gap[ok]) / alpha[ok])
    # A flat replicate (A = 0 or alpha = 0) above its asymptote is reached by any data size.
    out[(gap > 0) & ~((A > 0) & (alpha > 0))] = 0.0
    return out


def data_efficiency(
    law: PowerLaw | PowerLawFit,
    losses: Mapping[str, float],
    d_real: float,
    reference_loss: float | None = None,
) -> list[Efficiency]:
    """Effective real tokens and multipliers for each method's loss, in the order given.

    ``law``: a fitted law (intervals from its bootstrap replicates) or a PowerLaw (no
    intervals). ``d_real``: the real tokens the methods trained on. ``reference_loss``: divide
    by D_eff(reference_loss) instead of d_real (the predecessor's definition).
    A method loss at or below the asymptote is a ValueError naming the method.
    """
    if not (d_real > 0):
        raise ValueError(f"d_real must be > 0, got {d_real}")
    fit = law if isinstance(law, PowerLawFit) else None
    point = fit.law if fit is not None else law
    reps = fit.replicates if fit is not None and fit.replicates is not None else None

    ref_point = effective_tokens(point, reference_loss) if reference_loss is not None else d_real
    ref_reps = None
    if reps is not None and reference_loss is not None:
        ref_reps = _replicate_d_eff(reps, reference_loss)

    out = []
    for name, loss in losses.items():
        try:
            d_eff = effective_tokens(point, float(loss))
        except ValueError as e:
            raise ValueError(f"method {name!r}: {e}") from None
        row = Efficiency(name=name, loss=float(loss), d_real=float(d_real), d_eff=d_eff,
                         multiplier=d_eff / ref_point)
        if reps is not None:
            rep = _replicate_d_eff(reps, float(loss))
            denom = ref_reps if ref_reps is not None else np.full(len(rep), float(d_real))
            with np.errstate(invalid="ignore", divide="ignore"):
                mult = rep / denom
            tail = fit.tail
            # inverted_cdf picks actual replicate values, so an inf upper end stays inf.
            row.d_eff_lo, row.d_eff_hi = (float(v) for v in np.quantile(rep, [tail, 1 - tail], method="inverted_cdf"))
            finite = mult[~np.isnan(mult)]
            if finite.size:
                row.multiplier_lo, row.multiplier_hi = (
                    float(v) for v in np.quantile(finite, [tail, 1 - tail], method="inverted_cdf")
                )
            row.level, row.n_replicates = fit.level, len(rep)
            row.n_unbounded = int(np.isinf(rep).sum())
        out.append(row)
    return out


def efficiency_of_loss_samples(
    law: PowerLaw,
    name: str,
    loss: float,
    loss_samples: Sequence[float],
    d_real: float,
    level: float = 0.9,
    tail: float | None = None,
) -> Efficiency:
    """Multiplier of ``loss`` under a fixed law, with an interval from samples of that loss.

    For when the uncertainty is in the method's loss rather than in the law: e.g. the bootstrap
    replicates of a method's fitted asymptote C (its loss as G -> infinity). Samples at or
    below the law's asymptote give D_eff = inf (counted in ``n_unbounded``). ``tail``: the
    percentile taken at each end (pass ``fit.tail`` for a fit's replicates; default (1-level)/2).
    """
    try:
        d_eff = effective_tokens(law, float(loss))
    except ValueError as e:
        raise ValueError(f"method {name!r}: {e}") from None
    samples = np.asarray(loss_samples, dtype=float)
    rep = np.full(samples.size, np.inf)
    ok = samples > law.C  # the law is not flat: effective_tokens above succeeded
    with np.errstate(over="ignore"):
        rep[ok] = (law.A / (samples[ok] - law.C)) ** (1.0 / law.B)
    tail = (1.0 - level) / 2.0 if tail is None else tail
    lo, hi = np.quantile(rep, [tail, 1 - tail], method="inverted_cdf")
    return Efficiency(name=name, loss=float(loss), d_real=float(d_real), d_eff=d_eff, multiplier=d_eff / d_real,
                      d_eff_lo=float(lo), d_eff_hi=float(hi), multiplier_lo=float(lo) / d_real,
                      multiplier_hi=float(hi) / d_real, level=level, n_replicates=int(samples.size),
                      n_unbounded=int(np.isinf(rep).sum()))


def format_efficiency_table(rows: Sequence[Efficiency]) -> str:
    """A Markdown table: method, loss, D_eff, multiplier (with intervals when present)."""
    lines = ["| method | loss | D_real | D_eff | multiplier |", "|---|---|---|---|---|"]

    def rng(v: float, lo: float, hi: float, fmt: str) -> str:
        if math.isnan(lo):
            return format(v, fmt)
        return f"{format(v, fmt)} [{format(lo, fmt)}, {format(hi, fmt)}]"

    for r in rows:
        lines.append(
            f"| {r.name} | {r.loss:.4f} | {r.d_real:.4g} | {rng(r.d_eff, r.d_eff_lo, r.d_eff_hi, '.4g')} | "
            f"{rng(r.multiplier, r.multiplier_lo, r.multiplier_hi, '.3f')}x |"
        )
    notes = [f"- {r.name}: in {r.n_unbounded}/{r.n_replicates} bootstrap replicates the loss is at or below "
             "the law's asymptote (D_eff = inf)" for r in rows if r.n_unbounded]
    return "\n".join(lines + notes)
