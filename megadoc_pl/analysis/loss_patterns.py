"""MAGA loss-pattern analysis: where along a document one model falls behind another.

Definitions (docs/papers.md, MAGA 14.2), for one document with per-token losses of model A (the
reference, e.g. trained on real data) and model B (e.g. trained with synthetic data) on the
same L predicted tokens:

* ``diff[i] = loss_B[i] - loss_A[i]``: positive where B predicts worse.
* ``mu = mean(diff)``, ``sigma = std(diff)`` over the document's **per-token** differences
  (population std, ddof 0), as the MAGA paper defines them: the threshold then measures a
  window against the token-level spread, so a window stands out only when its average is
  far outside what single tokens typically do.
* window ``w = max(1, round_half_up(0.05 * L))`` tokens; windowed mean
  ``m[p] = mean(diff[p : p + w])`` for every start ``p = 0 .. L - w`` (sliding, step 1).
* **first anomaly**: the smallest start ``p`` with ``|m[p]| > |mu| + k * sigma`` (absolute
  value: a large deviation by either model), or none. Ties within 1e-9 of the largest |diff|
  do not count, so floating-point rounding cannot invent anomalies (e.g. a constant diff).
* relative position ``100 * p / L`` (0-based start, so in [0, 100)); -1 when there is none.
  The paper counts p from 1; ours is that value minus 100 / L percent.

Histograms of the relative position (per k; MAGA's k is not published, so several k are
reported, default 1, 2, 3), also split by the document's mean difference (<= 0, 0-0.25,
0.25-0.5, > 0.5, the paper's buckets), and an HTML page of example documents with tokens
coloured by their difference.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from megadoc_pl.utils import atomic_write_json, atomic_write_text, iter_jsonl

DEFAULT_KS = (1.0, 2.0, 3.0)
DEFAULT_FRACTION = 0.05
MEAN_DIFF_BUCKETS = ((-math.inf, 0.0, "<=0"), (0.0, 0.25, "0-0.25"), (0.25, 0.5, "0.25-0.5"), (0.5, math.inf, ">0.5"))


def window_size(length: int, fraction: float = DEFAULT_FRACTION) -> int:
    """max(1, round_half_up(fraction * length))."""
    if length < 1:
        raise ValueError(f"a document needs at least one predicted token, got length {length}")
    if not 0 < fraction <= 1:
        raise ValueError(f"window fraction must be in (0, 1], got {fraction}")
    return max(1, int(math.floor(fraction * length + 0.5)))


def windowed_means(diff: np.ndarray, w: int) -> np.ndarray:
    """Mean of every length-w window: ``m[p] = mean(diff[p:p+w])``, p = 0 .. L - w (via cumsum)."""
    diff = np.asarray(diff, dtype=np.float64)
    if not 1 <= w <= diff.size:
        raise ValueError(f"window {w} must be between 1 and the length {diff.size}")
    c = np.concatenate([[0.0], np.cumsum(diff)])
    return (c[w:] - c[:-w]) / w


def loss_diff(loss_a: Sequence[float], loss_b: Sequence[float], name: str = "document") -> np.ndarray:
    """Per-token ``loss_b - loss_a`` (same length and all finite, else a ValueError naming ``name``)."""
    a = np.asarray(loss_a, dtype=np.float64).ravel()
    b = np.asarray(loss_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"{name}: the two loss arrays differ in length ({a.size} vs {b.size}); "
                         "were they computed on the same tokens?")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"{name}: non-finite per-token losses")
    return b - a


@dataclass
class Anomaly:
    """The first window of one document whose mean deviates by more than |mu| + k sigma."""

    length: int
    window: int
    mean: float  # mu over per-token differences
    std: float  # sigma over per-token differences (ddof 0)
    k: float
    threshold: float  # |mu| + k * sigma
    position: int | None  # 0-based start of the first anomalous window, None if none
    window_mean: float | None  # its windowed mean

    @property
    def relative_position(self) -> float:
        """100 * position / length, or -1 when there is no anomaly."""
        return -1.0 if self.position is None else 100.0 * self.position / self.length


def first_anomaly(diff: Sequence[float], k: float, fraction: float = DEFAULT_FRACTION) -> Anomaly:
    """The first window (of 5% of the document by default) with |mean| > |mu| + k * sigma."""
    d = np.asarray(diff, dtype=np.float64).ravel()
    w = window_size(d.size, fraction)
    mu, sigma = float(d.mean()), float(d.std())
    threshold = abs(mu) + k * sigma
    m = windowed_means(d, w)
    # Rounding (cumsum, mean) must not create anomalies where the exact values tie the threshold.
    tol = 1e-9 * float(np.max(np.abs(d)))
    hits = np.flatnonzero(np.abs(m) > threshold + tol)
    pos = int(hits[0]) if hits.size else None
    return Anomaly(length=d.size, window=w, mean=mu, std=sigma, k=float(k), threshold=threshold,
                   position=pos, window_mean=float(m[pos]) if pos is not None else None)


def _bucket_of(mean_diff: float) -> str:
    for lo, hi, label in MEAN_DIFF_BUCKETS:
        if lo < mean_diff <= hi:
            return label
    return MEAN_DIFF_BUCKETS[0][2]


def position_histogram(relative_positions: Iterable[float], bins: int = 10) -> dict:
    """Counts of relative positions in ``bins`` equal bins over [0, 100), plus ``none`` (-1)."""
    pos = np.asarray(list(relative_positions), dtype=np.float64)
    found = pos[pos >= 0]
    edges = np.linspace(0.0, 100.0, bins + 1)
    idx = np.minimum((found * bins / 100.0).astype(int), bins - 1)
    counts = np.bincount(idx, minlength=bins) if found.size else np.zeros(bins, dtype=int)
    return {"edges": edges.tolist(), "counts": counts.astype(int).tolist(), "none": int((pos < 0).sum())}


def analyze(
    losses_a: Sequence[Sequence[float]],
    losses_b: Sequence[Sequence[float]],
    ids: Sequence[str] | None = None,
    ks: Sequence[float] = DEFAULT_KS,
    fraction: float = DEFAULT_FRACTION,
    bins: int = 10,
) -> dict:
    """Per-document statistics and first anomalies for each k, and position histograms.

    ``losses_a[j]`` and ``losses_b[j]`` are the per-token losses of document j under models A
    and B (same tokens). Returns a JSON-ready report (see the module docstring for definitions).
    """
    if len(losses_a) != len(losses_b):
        raise ValueError(f"model A has losses for {len(losses_a)} documents, model B for {len(losses_b)}")
    ids = list(ids) if ids is not None else [str(j) for j in range(len(losses_a))]
    ks = [float(k) for k in ks]
    docs = []
    for j, (a, b) in enumerate(zip(losses_a, losses_b)):
        d = loss_diff(a, b, name=f"document {ids[j]}")
        anomalies = {str(k): first_anomaly(d, k, fraction) for k in ks}
        first = next(iter(anomalies.values()))
        docs.append({
            "id": ids[j],
            "length": int(d.size),
            "window": first.window,
            "mean_diff": first.mean,
            "std_diff": first.std,
            "mean_loss_a": float(np.mean(a)),
            "mean_loss_b": float(np.mean(b)),
            "bucket": _bucket_of(first.mean),
            "first_anomaly": {k: an.position for k, an in anomalies.items()},
            "relative_position": {k: an.relative_position for k, an in anomalies.items()},
        })
    histograms = {}
    for k in map(str, ks):
        h = position_histogram((doc["relative_position"][k] for doc in docs), bins)
        h["by_mean_diff"] = {
            label: position_histogram((doc["relative_position"][k] for doc in docs if doc["bucket"] == label), bins)
            for _, _, label in MEAN_DIFF_BUCKETS
        }
        histograms[k] = h
    return {
        "definition": {
            "diff": "loss_B - loss_A per predicted token (positive: model B worse)",
            "mu_sigma": "mean and population std of the per-token differences of the document",
            "window": f"max(1, round_half_up({fraction} * L)) tokens, sliding by one token",
            "first_anomaly": "smallest 0-based window start p with |mean(diff[p:p+w])| > |mu| + k*sigma",
            "relative_position": "100 * p / L, -1 when no window crosses the threshold",
        },
        "fraction": fraction,
        "ks": ks,
        "num_documents": len(docs),
        "documents": docs,
        "histograms": histograms,
    }


def summary_lines(report: dict) -> list[str]:
    """A short text summary: documents, mean difference, anomaly rate and median position per k."""
    docs = report["documents"]
    lines = [f"{len(docs)} documents; mean diff (B - A) {np.mean([d['mean_diff'] for d in docs]):+.4f} nats/token"]
    for k in map(str, report["ks"]):
        pos = [d["relative_position"][k] for d in docs if d["relative_position"][k] >= 0]
        med = f"median position {np.median(pos):.1f}%" if pos else "no anomalies"
        lines.append(f"k={k}: first anomaly in {len(pos)}/{len(docs)} documents; {med}")
    return lines


# --------------------------------------------------------------------------- loss files


def read_losses(path: str | Path) -> tuple[list[str] | None, list[np.ndarray], list[list[str]] | None]:
    """Per-document loss arrays from a file: (ids or None, losses, token strings or None).

    * ``.jsonl``: one document per line, an object ``{"id", "losses": [...], "tokens": [...]}``
      (id and tokens optional) or a bare list of losses.
    * ``.npz``: one array per document, keyed by document id (``np.savez(f, **{id: arr})``).
    * ``.npy``: a 2-D float array, one row per document, right-padded with NaN (or 1-D: one document).
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such loss file")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            ids = list(z.files)
            return ids, [np.asarray(z[i], dtype=np.float64).ravel() for i in ids], None
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except ValueError:
            raise ValueError(f"{p}: object arrays are not read (unsafe); save a NaN-padded 2-D array, .npz or JSONL") from None
        arr = np.atleast_2d(np.asarray(arr, dtype=np.float64))
        rows = []
        for r in arr:
            valid = np.flatnonzero(~np.isnan(r))
            rows.append(r[: valid[-1] + 1] if valid.size else r[:0])
        return None, rows, None
    ids: list[str] = []
    losses: list[np.ndarray] = []
    tokens: list[list[str]] = []
    all_have_ids = True
    for n, row in iter_jsonl(p):
        if isinstance(row, list):
            row = {"losses": row}
        if not isinstance(row, dict) or not isinstance(row.get("losses"), list):
            raise ValueError(f"{p}:{n}: expected {{\"losses\": [...]}} or a list of numbers")
        all_have_ids &= "id" in row
        ids.append(str(row.get("id", len(losses))))
        losses.append(np.asarray(row["losses"], dtype=np.float64))
        if isinstance(row.get("tokens"), list):
            tokens.append([str(t) for t in row["tokens"]])
    return (ids if all_have_ids else None), losses, (tokens if len(tokens) == len(losses) else None)


def pair_losses(a: tuple, b: tuple) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list | None]:
    """Align two ``read_losses`` results by id (when both have ids and they match as sets) or order."""
    ids_a, la, ta = a
    ids_b, lb, tb = b
    if ids_a is not None and ids_b is not None and set(ids_a) == set(ids_b) and ids_a != ids_b:
        order = {i: j for j, i in enumerate(ids_b)}
        lb = [lb[order[i]] for i in ids_a]
        tb = [tb[order[i]] for i in ids_a] if tb is not None else None
    elif len(la) != len(lb):
        raise ValueError(f"the loss files hold {len(la)} and {len(lb)} documents; they must cover the same documents")
    ids = ids_a or ids_b or [str(j) for j in range(len(la))]
    return ids, la, lb, ta if ta is not None else tb


def write_losses_jsonl(path: str | Path, ids: Sequence[str], losses: Sequence[np.ndarray],
                       tokens: Sequence[Sequence[str]] | None = None) -> None:
    lines = []
    for j, (i, loss) in enumerate(zip(ids, losses)):
        row: dict[str, Any] = {"id": i, "losses": [round(float(v), 6) for v in loss]}
        if tokens is not None:
            row["tokens"] = list(tokens[j])
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- scoring with a model


def load_scoring_model(path: str | Path, device: str = "cpu"):
    """A callable ``ids -> per-token losses of ids[1:]`` with the project's Llama, in fp32.

    ``path`` is whatever ``megadoc_pl.checkpoints.load_model`` takes (a checkpoint, a run
    directory, a Hugging Face export), imported here, not at module import, so the analysis
    package needs no torch until a model is scored.
    """
    import torch

    from megadoc_pl.checkpoints import load_model

    model = load_model(path, device=device, dtype=torch.float32).model

    @torch.no_grad()
    def score(ids: Sequence[int]) -> np.ndarray:
        x = torch.tensor([list(ids)], device=device)
        hidden = model(x[:, :-1])
        return model.loss(hidden, x[:, 1:], reduction="none")[0].float().cpu().numpy()

    return score


def score_documents(
    models: Sequence[str | Path],
    documents: str | Path,
    tokenizer: str | Path,
    text_field: str = "text",
    id_field: str = "id",
    max_tokens: int = 2048,
    max_documents: int | None = None,
    add_bos: bool = True,
    device: str = "cpu",
) -> tuple[list[str], list[list[np.ndarray]], list[list[str]]]:
    """Tokenise documents once and score them under each model.

    Returns (ids, losses per model per document, token strings of the predicted tokens).
    Documents are truncated to ``max_tokens`` tokens (BOS included); one-token documents are skipped.
    """
    from tqdm import tqdm

    from megadoc_pl.data.readers import iter_documents
    from megadoc_pl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    tok.require_special(add_bos, False)  # BOS requested but absent is an error, as for the store
    ids, token_ids, strings = [], [], []
    for doc in iter_documents([documents], text_field=text_field, id_field=id_field):
        t = tok.encode(doc.text)
        if add_bos:
            t = [tok.bos_id] + t
        t = t[:max_tokens]
        if len(t) < 2:
            continue
        ids.append(doc.id)
        token_ids.append(t)
        strings.append([tok.decode([i]) for i in t[1:]])
        if max_documents is not None and len(ids) >= max_documents:
            break
    if not ids:
        raise ValueError(f"{documents}: no document with at least two tokens")
    losses = []
    for m in models:
        scorer = load_scoring_model(m, device)
        losses.append([scorer(t) for t in tqdm(token_ids, desc=f"scoring {Path(m).name}", unit="doc")])
    return ids, losses, strings


# --------------------------------------------------------------------------- HTML view


def _colour(d: float, scale: float) -> str:
    a = min(1.0, abs(d) / scale) if scale > 0 else 0.0
    rgb = "220,40,40" if d > 0 else "40,90,220"
    return f"rgba({rgb},{a * 0.85:.3f})"


def render_html(
    report: dict,
    diffs: Sequence[np.ndarray],
    tokens: Sequence[Sequence[str]] | None = None,
    k: float | None = None,
    max_documents: int = 20,
    label_a: str = "A",
    label_b: str = "B",
) -> str:
    """An HTML page: the documents with the largest mean difference, tokens coloured by diff.

    Red: model B worse (diff > 0); blue: B better; opacity ~ |diff| (saturating at the 99th
    percentile of |diff| over the shown documents). The first anomalous window for ``k``
    (default: the first k of the report) is outlined.
    """
    k_key = str(float(k)) if k is not None else str(report["ks"][0])
    docs = report["documents"]
    order = sorted(range(len(docs)), key=lambda j: -docs[j]["mean_diff"])[:max_documents]
    shown = np.concatenate([np.abs(diffs[j]) for j in order]) if order else np.zeros(1)
    scale = float(np.quantile(shown, 0.99)) or 1.0
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>loss patterns</title><style>",
        "body{font-family:sans-serif;max-width:1100px;margin:auto}",
        ".doc{border:1px solid #ccc;padding:8px;margin:12px 0}",
        ".toks{font-family:monospace;white-space:pre-wrap;line-height:1.6}",
        ".anom{outline:2px solid #000}",
        "</style></head><body>",
        f"<h1>Per-token loss difference: {html.escape(label_b)} &minus; {html.escape(label_a)}</h1>",
        f"<p>Red: {html.escape(label_b)} worse; blue: {html.escape(label_b)} better; full colour at "
        f"|diff| &ge; {scale:.3g} nats. Outlined: the first window whose mean exceeds |&mu;| + {k_key}&sigma; "
        f"(window {report['fraction']:.0%} of the document). {len(order)} of {len(docs)} documents, "
        "largest mean difference first.</p>",
    ]
    for j in order:
        d = docs[j]
        pos = d["first_anomaly"][k_key]
        lo, hi = (pos, pos + d["window"]) if pos is not None else (-1, -1)
        rel = d["relative_position"][k_key]
        parts.append(
            f"<div class='doc'><b>{html.escape(d['id'])}</b> &mdash; {d['length']} tokens, mean diff "
            f"{d['mean_diff']:+.3f}, std {d['std_diff']:.3f}, first anomaly "
            f"{'none' if pos is None else f'at {pos} ({rel:.1f}%)'}<div class='toks'>"
        )
        toks = tokens[j] if tokens is not None else None
        for i, v in enumerate(diffs[j]):
            text = toks[i] if toks is not None and i < len(toks) else "\u00b7"
            cls = " class='anom'" if lo <= i < hi else ""
            parts.append(f"<span{cls} style='background:{_colour(float(v), scale)}' "
                         f"title='pos {i}: diff {float(v):+.3f}'>{html.escape(text)}</span>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_outputs(
    out_dir: str | Path,
    report: dict,
    diffs: Sequence[np.ndarray],
    tokens: Sequence[Sequence[str]] | None = None,
    max_examples: int = 20,
    label_a: str = "A",
    label_b: str = "B",
) -> list[Path]:
    """report.json, examples.html, histogram_k<k>.png per k and example_<j>.png for the top documents."""
    from megadoc_pl.analysis import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "examples.html"]
    atomic_write_json(paths[0], report)
    atomic_write_text(paths[1], render_html(report, diffs, tokens, max_documents=max_examples,
                                            label_a=label_a, label_b=label_b))
    for k in map(str, report["ks"]):
        p = out / f"histogram_k{k}.png"
        plots.plot_anomaly_histogram(report["histograms"][k], p, title=f"first anomaly position, k={k}")
        paths.append(p)
    docs = report["documents"]
    top = sorted(range(len(docs)), key=lambda j: -docs[j]["mean_diff"])[: min(3, max_examples)]
    for rank, j in enumerate(top):
        p = out / f"example_{rank}.png"
        plots.plot_loss_diff(diffs[j], windowed_means(diffs[j], int(docs[j]["window"])), docs[j], p)
        paths.append(p)
    return paths
