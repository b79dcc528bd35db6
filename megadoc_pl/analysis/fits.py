"""Power-law fits ``L(x) = A / x^B + C`` with non-negative parameters and bootstrap intervals.

x is model parameters N, generations G, ensemble members K or tokens D; C is the asymptote
(the loss as x -> infinity). The megadocs code fits this form with ``scipy.curve_fit``, bounds
A, B, C >= 0 and one start (docs/papers.md, megadocs 6.1). One start is fragile: the loss surface
is flat along the A-B valley and a bad start ends on a bound. We use two solvers that check
each other:

* **Profile (variable projection).** For a fixed exponent B the model is linear in (A, C), so
  the best non-negative (A, C) has a closed form (a two-variable non-negative least squares).
  That leaves a one-dimensional problem in B, solved on a log grid and refined by golden
  section. It finds the global optimum up to the grid, and it vectorises over bootstrap
  replicates, which keeps thousands of refits cheap.
* **least_squares with bounds** polishes the point estimate from several starts (the profile
  optimum, a log-log slope start, and the megadocs code's p0); the lowest sum of squares wins.

Bootstrap: *points* (resample the (x, y) pairs; assumes nothing about the noise but needs
enough distinct x values that a resample still pins three parameters) or *residuals* (keep x,
resample the fit's centred residuals inflated by sqrt(n / (n - 3)); assumes the law is right
and the noise homoscedastic, but works with the 4-8 points a scaling sweep usually has).
``method="auto"`` picks points when there are at least ``MIN_DISTINCT_X_FOR_POINTS`` distinct x
values, else residuals.

Intervals are *expanded* bootstrap percentiles (Hesterberg's small-sample fix): the bootstrap
treats the noise scale as known, while it is estimated from n - 3 residual degrees of freedom,
so plain percentile intervals under-cover with few points (0.75-0.8 for a nominal 0.9 with 6-8
points, measured over 100 simulated sweeps). The percentile level is widened to the one whose
normal quantile equals Student's t quantile with n - 3 degrees of freedom,
``tail = Phi(-t_{n-3}(1 - (1 - level) / 2))``; simulated coverage is then 0.85-0.9 (see
tests/analysis/test_analysis_fits.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

PARAMS = ("A", "B", "C")
MIN_DISTINCT_X_FOR_POINTS = 10  # fewer: a pairs resample often keeps only 3-5 distinct x (unstable B)
DEFAULT_MAX_EXPONENT = 5.0  # upper bound on B; loss curves in x = N, G, K, D have B well below
_GRID_SIZE = 240  # log-spaced exponents scanned by the profile solver
_GRID_MIN = 1e-3  # smallest non-zero exponent on the grid (B = 0 is handled as a constant)
_GOLDEN_ITERS = 48  # golden-section steps inside one grid cell (shrinks it by 0.618^48 ~ 1e-10)


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = A / x^B + C."""

    A: float
    B: float
    C: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.A / np.power(np.asarray(x, dtype=float), self.B) + self.C

    def inverse(self, loss: float) -> float:
        """The x at which the law reaches ``loss``: (A / (loss - C))^(1/B); exact.

        ValueError when the loss is at or below the asymptote C (no finite x reaches it) or the
        law is flat (A = 0 or B = 0).
        """
        if not math.isfinite(loss):
            raise ValueError(f"loss {loss} is not finite")
        if loss <= self.C:
            raise ValueError(
                f"loss {loss:.6g} is at or below the asymptote C={self.C:.6g} of {self.formula()}: "
                "below the asymptote, no finite x reaches it"
            )
        if self.A <= 0 or self.B <= 0:
            raise ValueError(f"{self.formula()} is flat (A or B is 0): it cannot be inverted")
        return (self.A / (loss - self.C)) ** (1.0 / self.B)

    def formula(self) -> str:
        return f"{self.A:.6g} / x^{self.B:.6g} + {self.C:.6g}"

    def as_dict(self) -> dict:
        return {"A": self.A, "B": self.B, "C": self.C}


@dataclass
class PowerLawFit:
    """A fitted law, its data, and (if bootstrapped) percentile intervals for A, B, C."""

    law: PowerLaw
    x: np.ndarray
    y: np.ndarray
    sse: float
    level: float = 0.9
    bootstrap: str = "none"  # points | residuals | none
    n_boot: int = 0
    intervals: dict = field(default_factory=dict)  # "A"/"B"/"C" -> (lo, hi)
    replicates: np.ndarray | None = None  # (R, 3) bootstrap estimates of A, B, C
    tail: float = 0.05  # the (expanded) percentile taken at each end: intervals are [tail, 1 - tail]
    notes: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.x.size)

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sse / self.n)

    def interval(self, name: str) -> tuple[float, float]:
        return self.intervals.get(name, (math.nan, math.nan))

    def as_dict(self) -> dict:
        """JSON-ready: missing intervals are null (strict JSON has no NaN)."""
        out = {"n": self.n, "sse": self.sse, "rmse": self.rmse, "formula": self.law.formula()}
        out["level"] = self.level
        out["bootstrap"] = self.bootstrap
        out["n_boot"] = self.n_boot
        for name in PARAMS:
            lo, hi = self.interval(name)
            out[name] = getattr(self.law, name)
            out[f"{name}_lo"], out[f"{name}_hi"] = json_number(lo), json_number(hi)
        out["notes"] = list(self.notes)
        return out


def json_number(v: float) -> float | str | None:
    """A float for strict JSON: NaN -> null, +-inf -> "inf" / "-inf"."""
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


# --------------------------------------------------------------------------- profile solver


def _check_xy(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length ({x.size} vs {y.size})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("x and y must be finite numbers (found NaN or inf)")
    if np.any(x <= 0):
        raise ValueError(
            f"x must be > 0 for a power law (smallest x is {x.min():g}); "
            "shift it, e.g. fit in 1 + G instead of G (x_offset=1)"
        )
    if np.unique(x).size < 3:
        raise ValueError(f"need at least 3 distinct x values to fit A, B, C; got {np.unique(x).size}")
    return x, y


def _nnls_given_b(f: np.ndarray, W: np.ndarray, Yc: np.ndarray, y_ref: float):
    """Best A_u >= 0, C >= 0 for y = A_u f + C with weights, for a fixed exponent.

    ``f`` is (..., n) basis values x_u^-B, ``W`` (..., n) weights, ``Yc`` (..., n) targets minus
    ``y_ref`` (centring keeps the variance formulas accurate when losses sit near 3.4 and
    differ in the third decimal). Returns (A_u, C, sse), each of shape (...).
    """
    sw = W.sum(-1)
    fm = (W * f).sum(-1) / sw
    ym_c = (W * Yc).sum(-1) / sw
    df = f - fm[..., None]
    dy = Yc - ym_c[..., None]
    var_f = (W * df * df).sum(-1) / sw
    cov = (W * df * dy).sum(-1) / sw
    var_y = (W * dy * dy).sum(-1) / sw
    ym = ym_c + y_ref

    # Interior solution (valid when A >= 0 and C >= 0).
    ok_f = var_f > 1e-300
    a_int = np.where(ok_f, cov / np.where(ok_f, var_f, 1.0), 0.0)
    c_int = ym - a_int * fm
    sse_int = sw * np.maximum(var_y - a_int * cov, 0.0)
    interior = ok_f & (a_int >= 0) & (c_int >= 0)

    # Edge A = 0: a constant.
    c_e1 = np.maximum(ym, 0.0)
    sse_e1 = sw * (var_y + (ym - c_e1) ** 2)
    # Edge C = 0: a pure power law through the origin (raw y, not centred).
    Y = Yc + y_ref
    sff = (W * f * f).sum(-1)
    sfy = (W * f * Y).sum(-1)
    a_e2 = np.maximum(sfy / np.maximum(sff, 1e-300), 0.0)
    sse_e2 = (W * (Y - a_e2[..., None] * f) ** 2).sum(-1)

    use_e2 = sse_e2 < sse_e1
    a_edge = np.where(use_e2, a_e2, 0.0)
    c_edge = np.where(use_e2, 0.0, c_e1)
    sse_edge = np.where(use_e2, sse_e2, sse_e1)
    a = np.where(interior, a_int, a_edge)
    c = np.where(interior, c_int, c_edge)
    sse = np.where(interior, sse_int, sse_edge)
    return a, c, sse


def _profile_fit(log_u: np.ndarray, W: np.ndarray, Y: np.ndarray, max_exponent: float):
    """Global least-squares fit for R problems sharing x: W, Y are (R, n); x_u = exp(log_u).

    Returns A_u, B, C, sse, each (R,). A_u is in units of the scaled x (x_u = x / scale).
    """
    y_ref = float(np.mean(Y))
    Yc = Y - y_ref
    grid = np.concatenate([[0.0], np.geomspace(_GRID_MIN, max_exponent, _GRID_SIZE)])
    f_GN = np.exp(-grid[:, None] * log_u[None, :])
    R = Y.shape[0]
    best_sse = np.full(R, np.inf)
    best_i = np.zeros(R, dtype=int)
    # Chunk the grid so (R, chunk, n) stays small for thousands of replicates.
    chunk = max(1, 4_000_000 // max(1, R * log_u.size))
    for g0 in range(0, grid.size, chunk):
        f = f_GN[None, g0 : g0 + chunk, :]
        _, _, sse = _nnls_given_b(f, W[:, None, :], Yc[:, None, :], y_ref)
        i = np.argmin(sse, axis=1)
        s = sse[np.arange(R), i]
        better = s < best_sse
        best_sse = np.where(better, s, best_sse)
        best_i = np.where(better, i + g0, best_i)

    # Golden section inside the neighbouring grid cells (vectorised over replicates).
    lo = grid[np.maximum(best_i - 1, 0)]
    hi = grid[np.minimum(best_i + 1, grid.size - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0

    def sse_at(b: np.ndarray) -> np.ndarray:
        return _nnls_given_b(np.exp(-b[:, None] * log_u[None, :]), W, Yc, y_ref)[2]

    c1 = hi - inv_phi * (hi - lo)
    c2 = lo + inv_phi * (hi - lo)
    s1, s2 = sse_at(c1), sse_at(c2)
    for _ in range(_GOLDEN_ITERS):
        left = s1 < s2
        hi = np.where(left, c2, hi)
        lo = np.where(left, lo, c1)
        c2_new = np.where(left, c1, lo + inv_phi * (hi - lo))
        c1_new = np.where(left, hi - inv_phi * (hi - lo), c2)
        c1, c2 = c1_new, c2_new
        s1, s2 = sse_at(c1), sse_at(c2)
    b = np.where(s1 < s2, c1, c2)
    a_u, c, sse = _nnls_given_b(np.exp(-b[:, None] * log_u[None, :]), W, Yc, y_ref)
    # Keep the grid point if refinement did not help (it always should, up to rounding).
    grid_b = grid[best_i]
    worse = sse > best_sse
    if np.any(worse):
        a_g, c_g, s_g = _nnls_given_b(np.exp(-grid_b[:, None] * log_u[None, :]), W, Yc, y_ref)
        a_u, b, c, sse = (np.where(worse, a_g, a_u), np.where(worse, grid_b, b),
                          np.where(worse, c_g, c), np.where(worse, s_g, sse))
    # B is meaningless when A = 0 (a constant); report 0 so replicates do not scatter.
    b = np.where(a_u > 0, b, 0.0)
    return a_u, b, c, sse


def _to_original_units(a_u: np.ndarray, b: np.ndarray, log_scale: float) -> np.ndarray:
    # A_u / (x/s)^B = A_u s^B / x^B.
    return a_u * np.exp(b * log_scale)


# --------------------------------------------------------------------------- public API


def fit_power_law(
    x: Sequence[float], y: Sequence[float], *, max_exponent: float = DEFAULT_MAX_EXPONENT
) -> PowerLawFit:
    """Least-squares fit of L(x) = A / x^B + C with A, B, C >= 0 and B <= max_exponent.

    Starts: the profile optimum (global up to the exponent grid), a log-log slope start
    (C a margin below min(y), B from the slope of log(y - C) on log x), and the megadocs
    code's p0 (range * max(x)^0.5, 0.5, min y); each polished by ``least_squares`` with
    bounds in scaled x; the lowest sum of squares wins.
    """
    from scipy.optimize import least_squares

    x, y = _check_xy(x, y)
    log_x = np.log(x)
    log_scale = float(np.mean(log_x))  # x_u = x / geometric mean: keeps A_u of order |y|
    log_u = log_x - log_scale
    a_u, b, c, sse = _profile_fit(log_u, np.ones((1, x.size)), y[None, :], max_exponent)
    starts = [(float(a_u[0]), float(b[0]), float(c[0]))]

    span = float(y.max() - y.min())
    c0 = max(float(y.min()) - 0.1 * max(span, 1e-12), 0.0)
    slope = np.polyfit(log_u, np.log(np.maximum(y - c0, 1e-12)), 1)[0]
    b0 = float(np.clip(-slope, 0.05, max_exponent))
    a0 = float(np.exp(np.mean(np.log(np.maximum(y - c0, 1e-12)) + b0 * log_u)))
    starts.append((a0, b0, c0))
    # megadocs p0 = [range * max(x)^0.5, 0.5, min(y)] in raw x, converted to scaled x.
    starts.append((span * math.exp(0.5 * (log_x.max() - log_scale)), 0.5, float(y.min())))

    def resid(p: np.ndarray) -> np.ndarray:
        return p[0] * np.exp(-p[1] * log_u) + p[2] - y

    best = (float(sse[0]), starts[0])
    for p0 in starts:
        p0c = np.clip(np.asarray(p0, dtype=float), [0, 0, 0], [np.inf, max_exponent, np.inf])
        try:
            res = least_squares(resid, p0c, bounds=([0, 0, 0], [np.inf, max_exponent, np.inf]),
                                x_scale="jac", method="trf", max_nfev=2000)
        except (ValueError, FloatingPointError):
            continue
        s = float(np.sum(res.fun**2))
        if np.all(np.isfinite(res.x)) and s < best[0] * (1 - 1e-12):
            best = (s, tuple(float(v) for v in res.x))
    s_best, (a_u0, b0, c0) = best
    if a_u0 <= 0:
        b0 = 0.0
    law = PowerLaw(float(_to_original_units(np.array(a_u0), np.array(b0), log_scale)), b0, c0)
    fit = PowerLawFit(law=law, x=x, y=y, sse=s_best)
    if b0 >= max_exponent * (1 - 1e-6):
        fit.notes.append(f"exponent B hit its upper bound {max_exponent}")
    if a_u0 <= 0:
        fit.notes.append("A = 0: the data show no decrease with x (a constant fits best)")
    if c0 <= 0:
        fit.notes.append("C = 0: the asymptote sits on its lower bound (data show no floor)")
    if x.size == 3:
        fit.notes.append("3 points for 3 parameters: the curve interpolates, no residual degrees of freedom")
    return fit


def expanded_tail(level: float, n: int, n_params: int = 3) -> float:
    """Percentile tail for a ``level`` interval from n points: Phi(-t_{n-p}(1 - (1-level)/2))."""
    from scipy.stats import norm, t

    return float(norm.cdf(-t.ppf(1.0 - (1.0 - level) / 2.0, max(n - n_params, 1))))


def bootstrap_power_law(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_boot: int = 1000,
    level: float = 0.9,
    method: str = "auto",
    seed: int = 0,
    max_exponent: float = DEFAULT_MAX_EXPONENT,
) -> PowerLawFit:
    """Fit, then expanded bootstrap percentile intervals for A, B, C at ``level`` (e.g. 0.9).

    ``method``: "points" (resample (x, y) pairs), "residuals" (resample centred residuals,
    inflated by sqrt(n / (n - 3)), around the fitted curve at the same x), or "auto" (points
    with >= MIN_DISTINCT_X_FOR_POINTS distinct x, else residuals). Deterministic in ``seed``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    fit = fit_power_law(x, y, max_exponent=max_exponent)
    x, y = fit.x, fit.y
    n = x.size
    if method == "auto":
        method = "points" if np.unique(x).size >= MIN_DISTINCT_X_FOR_POINTS else "residuals"
    rng = np.random.default_rng(seed)
    log_x = np.log(x)
    log_scale = float(np.mean(log_x))
    log_u = log_x - log_scale

    if method == "points":
        # A pairs resample is a multinomial weight vector on the original points, so every
        # replicate shares x and the profile solver runs once for all of them.
        idx = rng.integers(0, n, size=(n_boot, n))
        W = np.zeros((n_boot, n))
        np.add.at(W, (np.arange(n_boot)[:, None], idx), 1.0)
        # Redraw replicates that keep fewer than 3 distinct x (three parameters unidentified).
        for _ in range(100):
            bad = (W > 0).sum(1) < 3
            if not bad.any():
                break
            idx = rng.integers(0, n, size=(int(bad.sum()), n))
            Wb = np.zeros((idx.shape[0], n))
            np.add.at(Wb, (np.arange(idx.shape[0])[:, None], idx), 1.0)
            W[bad] = Wb
        Y = np.broadcast_to(y, (n_boot, n)).copy()
    elif method == "residuals":
        if n <= 3:
            fit.notes.append("residual bootstrap needs more than 3 points; no intervals")
            fit.bootstrap = "residuals"
            return fit
        fitted = fit.law(x)
        r = y - fitted
        r = (r - r.mean()) * math.sqrt(n / (n - 3))
        Y = fitted[None, :] + r[rng.integers(0, n, size=(n_boot, n))]
        W = np.ones((n_boot, n))
    else:
        raise ValueError(f"unknown bootstrap method {method!r}: use points, residuals or auto")

    a_u, b, c, _ = _profile_fit(log_u, W, Y, max_exponent)
    reps = np.stack([_to_original_units(a_u, b, log_scale), b, c], axis=1)
    tail = expanded_tail(level, n)
    lo, hi = np.quantile(reps, [tail, 1.0 - tail], axis=0)
    fit.bootstrap, fit.n_boot, fit.level, fit.replicates, fit.tail = method, n_boot, level, reps, tail
    fit.intervals = {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAMS)}
    return fit


def fit_table_rows(fits: dict[str, PowerLawFit]) -> list[dict]:
    """One flat row per named fit (for printing, CSV or JSON)."""
    return [{"group": name, **fit.as_dict()} for name, fit in fits.items()]


def format_fit_table(fits: dict[str, PowerLawFit], x_name: str = "x") -> str:
    """A Markdown table: group, n, A, B, C with their intervals, rmse, bootstrap method."""
    lines = []
    any_fit = next(iter(fits.values()), None)
    pct = f"{round(100 * any_fit.level)}%" if any_fit is not None else ""
    arg = x_name if x_name.startswith("(") and x_name.endswith(")") else f"({x_name})"
    lines.append(f"L{arg} = A / {x_name}^B + C   (intervals: {pct}, expanded bootstrap percentile)")
    lines.append("| group | n | A | B | C (asymptote) | rmse | bootstrap |")
    lines.append("|---|---|---|---|---|---|---|")

    def cell(fit: PowerLawFit, name: str) -> str:
        v = getattr(fit.law, name)
        lo, hi = fit.interval(name)
        if math.isnan(lo):
            return f"{v:.4g}"
        return f"{v:.4g} [{lo:.4g}, {hi:.4g}]"

    notes = []
    for name, fit in fits.items():
        lines.append(
            f"| {name} | {fit.n} | {cell(fit, 'A')} | {cell(fit, 'B')} | {cell(fit, 'C')} | "
            f"{fit.rmse:.3g} | {fit.bootstrap} |"
        )
        notes += [f"- {name}: {note}" for note in fit.notes]
    return "\n".join(lines + notes)


def fit_groups(
    points: dict[str, tuple[Sequence[float], Sequence[float]]],
    x_offset: float = 0.0,
    x_scale: float = 1.0,
    **bootstrap,
) -> dict[str, PowerLawFit]:
    """Fit every group's points in x' = (x + x_offset) / x_scale, with bootstrap intervals.

    ``x_offset=1`` fits in 1 + G (so G = 0 can take part); ``x_scale=1e9`` fits N in
    billions (the megadocs convention; it only rescales A). Errors name the group.
    """
    fits = {}
    for name, (x, y) in points.items():
        xs = (np.asarray(x, dtype=float) + x_offset) / x_scale
        try:
            fits[name] = bootstrap_power_law(xs, y, **bootstrap)
        except ValueError as e:
            raise ValueError(f"group {name!r}: {e}") from None
    return fits
