"""PNG plots of runs and fits (matplotlib Figure objects, Agg canvas, no pyplot state, no GPU).

Every function takes plain data (dicts of lists, fits) and a path, writes one PNG atomically
and returns the path.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from megadoc_pl.analysis.fits import PowerLawFit
from megadoc_pl.utils import atomic_write_bytes

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]  # label -> (x values, losses)


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _fit_curve(ax, fit: PowerLawFit, x_lo: float, x_hi: float, colour, x_shift: float = 0.0,
               label: str | None = None) -> None:
    """The fitted law (solid), its bootstrap band at the fit's level (shaded) and asymptote C (dashed)."""
    xs = np.geomspace(x_lo, x_hi, 200)
    ax.plot(xs - x_shift, fit.law(xs), color=colour, lw=1.2, label=label)
    if fit.replicates is not None and len(fit.replicates):
        reps = fit.replicates
        curves = reps[:, 0:1] / xs[None, :] ** reps[:, 1:2] + reps[:, 2:3]
        lo, hi = np.quantile(curves, [fit.tail, 1 - fit.tail], axis=0)
        ax.fill_between(xs - x_shift, lo, hi, color=colour, alpha=0.15, lw=0)
    ax.axhline(fit.law.C, color=colour, ls="--", lw=0.9, alpha=0.8)


def plot_loss_vs_generations(
    series: Series,
    path: str | Path,
    fits: Mapping[str, PowerLawFit] | None = None,
    x_offset: float = 1.0,
    baseline: float | None = None,
    ylabel: str = "val/iid/loss",
    title: str = "loss vs generations per source",
    errors: Mapping[str, Sequence[float]] | None = None,
    baseline_error: float | None = None,
) -> Path:
    """Loss vs G per method on a log axis in 1 + G (the megadocs plot), optional fits in G + x_offset.

    ``errors`` (per label, one value per point) and ``baseline_error`` draw +- bars (the seed
    standard deviation of a sweep's cells) and a shaded band around the baseline.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    all_g: list[float] = []
    for i, (label, (g, loss)) in enumerate(series.items()):
        g = np.asarray(g, dtype=float)
        all_g += g.tolist()
        ax.plot(g + 1.0, loss, "o-", color=colours[i % 10], label=label, ms=4)
        if errors and label in errors:
            ax.errorbar(g + 1.0, loss, yerr=np.asarray(errors[label], dtype=float), fmt="none",
                        ecolor=colours[i % 10], capsize=3, lw=1)
        if fits and label in fits:
            f = fits[label]
            _fit_curve(ax, f, float(f.x.min()), float(f.x.max()) * 4, colours[i % 10], x_shift=x_offset - 1.0)
            ax.text(1.02, f.law.C, f"C={f.law.C:.3f}", color=colours[i % 10], fontsize=7,
                    transform=ax.get_yaxis_transform(), va="center")
    if baseline is not None:
        ax.axhline(baseline, color="k", ls=":", lw=1, label=f"real only {baseline:.4g}")
        if baseline_error:
            ax.axhspan(baseline - baseline_error, baseline + baseline_error, color="k", alpha=0.08, lw=0)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(all_g))
    ax.set_xticks([t + 1 for t in ticks])
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("generations per source G (axis: 1 + G, log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_vs_epochs(series: Series, path: str | Path, ylabel: str = "val/iid/loss",
                        title: str = "loss vs real epochs") -> Path:
    """Loss vs real epochs E (log2 axis), one line per label (e.g. method and G)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, (e, loss) in series.items():
        order = np.argsort(e)
        ax.plot(np.asarray(e, dtype=float)[order], np.asarray(loss, dtype=float)[order], "o-", label=label, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("real epochs E")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scaling_fits(fits: Mapping[str, PowerLawFit], path: str | Path, x_label: str = "x",
                      ylabel: str = "loss", title: str = "power-law fits L = A / x^B + C") -> Path:
    """Data points, fitted curves (extended 4x past the data), bootstrap bands and asymptotes."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, f) in enumerate(fits.items()):
        c = f"C{i % 10}"
        ax.plot(f.x, f.y, "o", color=c, ms=4)
        lab = f"{label}: {f.law.A:.3g}/x^{f.law.B:.3g} + {f.law.C:.4g}"
        _fit_curve(ax, f, float(f.x.min()), float(f.x.max()) * 4, c, label=lab)
    ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(ylabel)
    ax.set_title(title + " (dashed: asymptote C)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_by_position(curves: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                          title: str = "loss by position", log_x: bool = False) -> Path:
    """One line per run: mean loss against position (``{"position": [...], "loss": [...]}``)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, c in curves.items():
        ax.plot(c["position"], c["loss"], ".-", label=label, ms=3, lw=1)
    if log_x:
        ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xlabel("token position" + (" (log2)" if log_x else ""))
    ax.set_ylabel("mean loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_anomaly_histogram(hist: Mapping, path: str | Path, title: str = "first anomaly position") -> Path:
    """Relative position of the first anomalous window, stacked by the document's mean difference."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    edges = np.asarray(hist["edges"])
    width = np.diff(edges)
    bottom = np.zeros(len(width))
    groups = hist.get("by_mean_diff") or {"all": hist}
    for label, h in groups.items():
        counts = np.asarray(h["counts"], dtype=float)
        ax.bar(edges[:-1], counts, width=width, bottom=bottom, align="edge", label=f"mean diff {label}",
               edgecolor="white", lw=0.5)
        bottom += counts
    ax.set_xlabel("first anomaly position (% of document)")
    ax.set_ylabel("documents")
    ax.set_title(f"{title} ({hist['none']} documents without one)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_loss_diff(diff: Sequence[float], window_means: Sequence[float], doc: Mapping, path: str | Path) -> Path:
    """One document: per-token diff, its windowed mean (``m[p]`` over ``diff[p : p + w]``, w =
    ``doc["window"]``), thresholds per k and the first anomalies (``analysis.loss_patterns``)."""
    d = np.asarray(diff, dtype=float)
    w = int(doc["window"])
    m = np.asarray(window_means, dtype=float)
    fig = _figure(8.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(d.size), d, lw=0.5, color="0.6", label="per-token diff")
    ax.plot(np.arange(m.size) + (w - 1) / 2, m, lw=1.2, color="C0", label=f"window mean (w={w})")
    for i, (k, pos) in enumerate(doc["first_anomaly"].items()):
        thr = abs(doc["mean_diff"]) + float(k) * doc["std_diff"]
        ax.axhline(thr, ls="--", lw=0.8, color=f"C{i + 1}", label=f"|mu|+{float(k):g} sigma")
        ax.axhline(-thr, ls="--", lw=0.8, color=f"C{i + 1}")
        if pos is not None:
            ax.axvline(pos, color=f"C{i + 1}", lw=0.8)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss B - loss A (nats)")
    ax.set_title(f"{doc['id']}: mean diff {doc['mean_diff']:+.3f} (vertical: start of the first anomalous "
                 "window per k)", fontsize=9)
    ax.legend(fontsize=6, ncol=3)
    return _save(fig, path)


def plot_run_set(
    runs: Sequence,
    out_dir: str | Path,
    y: str = "val/iid/loss",
    method_key: str = "recipe",
    g_key: str = "data.generations",
    epochs_key: str = "data.mixture.real_epochs",
) -> tuple[list[Path], list[str]]:
    """The standard plots of a set of runs; returns (files written, notes on plots skipped).

    loss_vs_generations.png (best run per (method, G)), loss_vs_epochs.png (best run per
    (method, G, E), one line per method and G), loss_by_position_<set>_<kind>.png (one line per
    run). A plot without enough data (fewer than two x values on every line) is skipped.
    """
    from megadoc_pl.analysis.runs import points_by_group, read_loss_by_position

    out_dir = Path(out_dir)
    written: list[Path] = []
    notes: list[str] = []
    have_y = [r for r in runs if r.has(y)]
    with_g = [r for r in have_y if r.has(g_key)]
    series = points_by_group(with_g, g_key, y, method_key, "best") if with_g else {}
    series = {k: v for k, v in series.items() if len(v[0]) >= 2}
    if series:
        written.append(plot_loss_vs_generations(series, out_dir / "loss_vs_generations.png", ylabel=y))
    else:
        notes.append(f"loss_vs_generations: no {method_key} has runs at two or more {g_key} values")

    by_line: dict[str, list] = {}
    for r in have_y:
        if r.has(epochs_key):
            g = r.get(g_key)
            label = f"{r.get(method_key)}" + (f" G={g}" if g is not None else "")
            by_line.setdefault(label, []).append(r)
    ep_series = {}
    for label, rs in sorted(by_line.items()):
        pts = points_by_group(rs, epochs_key, y, None, "best")["all"]
        if len(pts[0]) >= 2:
            ep_series[label] = pts
    if ep_series:
        written.append(plot_loss_vs_epochs(ep_series, out_dir / "loss_vs_epochs.png", ylabel=y))
    else:
        notes.append(f"loss_vs_epochs: no method/G has runs at two or more {epochs_key} values")

    curves: dict[tuple[str, str], dict] = {}
    for r in runs:
        for set_name, path in r.loss_by_position_files().items():
            for kind, curve in read_loss_by_position(path).items():
                curves.setdefault((set_name, kind), {})[r.name] = curve
    for (set_name, kind), by_run in sorted(curves.items()):
        p = out_dir / f"loss_by_position_{set_name}_{kind}.png"
        written.append(plot_loss_by_position(by_run, p, title=f"loss by {kind} position: {set_name}",
                                             log_x=kind == "document"))
    if not curves:
        notes.append("loss_by_position: no run has loss_by_position_<set>.csv")
    return written, notes


def plot_multipliers(rows: Sequence[Mapping], path: str | Path,
                     title: str = "data efficiency: D_eff / D_real (real-only law L(D))") -> Path:
    """One bar per method: its multiplier, with the interval when there is one (rows: Efficiency dicts)."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = [r["name"] for r in rows]
    mult = np.array([float(r["multiplier"]) for r in rows])
    def num(v) -> float:  # JSON rows carry null for no interval and "inf" for an unbounded end
        return np.nan if v is None else float(v)

    lo = np.array([num(r.get("multiplier_lo")) for r in rows])
    hi = np.array([num(r.get("multiplier_hi")) for r in rows])
    ax.bar(range(len(rows)), mult, color=[f"C{i % 10}" for i in range(len(rows))])
    has = np.isfinite(lo) & ~np.isnan(hi)
    if has.any():
        finite = np.concatenate([mult, hi[np.isfinite(hi)]])
        cap = 1.5 * float(finite.max())  # an unbounded upper end is drawn to here and marked inf
        hi_drawn = np.where(np.isinf(hi), cap, hi)
        idx = np.flatnonzero(has)
        ax.errorbar(idx, mult[has], yerr=[mult[has] - lo[has], hi_drawn[has] - mult[has]], fmt="none", ecolor="k",
                    capsize=3)
        for i in np.flatnonzero(has & np.isinf(hi)):
            ax.text(i, cap, "inf", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", ls=":", lw=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("multiplier (x real tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_certificates(rows: Sequence[Mapping], path: str | Path, objective: str = "val/iid/loss") -> Path:
    """One line per certified tuned family (sweep_tune.report rows), on a shared axis of loss
    minus the family's optimum: its one-step neighbours (dots, labelled by the axis moved), the
    optimum at 0 (star; its loss under the family's name) and the optimum's range over seeds (red bar)."""
    from megadoc_pl.analysis.tuner import AXIS_SHORT

    rows = [r for r in rows if "certificate" in r]
    fig = _figure(7.2, 0.6 * len(rows) + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(rows):
        c = r["certificate"]
        best = float(c["objective"])
        for j, n in enumerate(sorted(c["neighbours"], key=lambda n: n["objective"])):
            label = f"{AXIS_SHORT.get(n['axis'], n['axis'].rsplit('.', 1)[-1])}{'+' if n['step'] > 0 else '-'}"
            ax.plot(n["objective"] - best, i, "o", color="C0", ms=4, alpha=0.8)
            ax.annotate(label, (n["objective"] - best, i), textcoords="offset points",
                        xytext=(0, 5 if j % 2 == 0 else -10), ha="center", fontsize=6)
        s = (r.get("seed_spread") or {}).get(objective)
        if s and s.get("n", 0) > 1:
            ax.plot([s["min"] - best, s["max"] - best], [i + 0.25, i + 0.25], "-", color="C3", lw=2)
        ax.plot(0.0, i, "*", color="C3", ms=10)
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['family']}\n{r['certificate']['objective']:.3f}" for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.4, -0.6)
    ax.set_xlabel(f"{objective} minus the optimum's (dots: one-step neighbours; red bar: the optimum's seeds)",
                  fontsize=8)
    ax.set_title("tuning certificates: no one-step neighbour is better than the optimum (star)", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
