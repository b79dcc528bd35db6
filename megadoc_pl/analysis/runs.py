"""Read run directories (``metrics.json`` + ``config.yaml`` + loss-by-position CSVs) into a table.

A run is looked up by *key*: a metrics key (``val/iid/loss``, ``tokens_seen``), a dotted config
key (``data.generations``, ``train.lr``) or ``name``. Metrics win over config on a clash.
Readers are tolerant: nested metrics are flattened with ``/``, a missing ``config.yaml`` gives an
empty config, and loss-by-position CSVs accept several column spellings. Bad files raise one-line
ValueErrors that name the file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from megadoc_pl.utils import atomic_write_text

LOSS_BY_POSITION_PREFIX = "loss_by_position_"

# The columns a run table shows by default (those no run has are dropped).
DEFAULT_COLUMNS = (
    "name", "recipe", "scale", "data.view", "data.generations", "data.mixture.real_epochs",
    "data.mixture.synthetic_fraction", "train.lr", "train.weight_decay", "model.attention_scope",
    "parameters", "tokens_seen", "steps", "wall_time_s", "train/loss",
)


def flatten(obj: Any, sep: str = ".", prefix: str = "") -> dict:
    """Nested dicts -> one level with joined keys (lists and scalars are leaves)."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, sep, key))
            else:
                out[key] = v
    else:
        out[prefix] = obj
    return out


@dataclass
class Run:
    """One run directory: its metrics (flat), its resolved config (flat, dotted keys)."""

    path: Path
    metrics: dict
    config: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.config.get("run.name") or self.path.name)

    def has(self, key: str) -> bool:
        return key == "name" or key in self.metrics or key in self.config

    def get(self, key: str, default: Any = None) -> Any:
        if key == "name":
            return self.name
        if key in self.metrics:
            return self.metrics[key]
        return self.config.get(key, default)

    def number(self, key: str) -> float:
        """A numeric value; ValueError naming the run and key when absent or not a number."""
        if not self.has(key):
            raise ValueError(
                f"{self.path}: no key {key!r} in metrics.json or config.yaml "
                f"(metrics keys: {', '.join(sorted(self.metrics)[:12])}...)"
            )
        v = self.get(key)
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{self.path}: {key}={v!r} is not a number") from None

    def loss_by_position_files(self) -> dict[str, Path]:
        """Validation set name -> its loss_by_position_<set>.csv in the run directory."""
        out = {}
        for p in sorted(self.path.glob(f"{LOSS_BY_POSITION_PREFIX}*.csv")):
            out[p.stem[len(LOSS_BY_POSITION_PREFIX):]] = p
        return out


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix or remove the file") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(obj).__name__}")
    return obj


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        obj = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f":{line + 1}" if line is not None else ""
        raise ValueError(f"{path}{where}: invalid YAML; fix or remove the file") from None
    return obj if isinstance(obj, dict) else {}


REAL_TOKENS_KEY = "derived/real_tokens"  # unique real tokens D of a run (the data-scaling x)


def _add_derived(metrics: dict) -> None:
    """Metrics computed from others: unique real tokens = real tokens seen / passes over real."""
    seen, passes = metrics.get("train/tokens/real"), metrics.get("train/passes/real")
    if isinstance(seen, (int, float)) and isinstance(passes, (int, float)) and passes > 0:
        metrics.setdefault(REAL_TOKENS_KEY, round(seen / passes))


def load_run(path: str | Path) -> Run:
    """A run from its directory or its metrics.json path."""
    p = Path(path)
    if p.is_dir():
        run_dir, metrics_path = p, p / "metrics.json"
    elif p.name == "metrics.json":
        run_dir, metrics_path = p.parent, p
    else:
        raise ValueError(f"{p}: not a run directory or a metrics.json file")
    if not metrics_path.exists():
        raise ValueError(f"{run_dir}: no metrics.json (is this a finished run directory?)")
    metrics = flatten(_read_json(metrics_path), sep="/")
    _add_derived(metrics)
    config_path = run_dir / "config.yaml"
    config = flatten(_read_yaml(config_path)) if config_path.exists() else {}
    return Run(path=run_dir, metrics=metrics, config=config)


def load_runs(paths: Iterable[str | Path], skip_missing: bool = False) -> list[Run]:
    """Runs from directories / metrics.json paths (sorted by name).

    ``skip_missing``: paths that are not finished runs (directories without metrics.json, other
    files such as a tuner's state file caught by ``runs/*``) are skipped, not errors.
    """
    runs = []
    for p in paths:
        p = Path(p)
        finished = (p / "metrics.json").exists() if p.is_dir() else p.name == "metrics.json"
        if skip_missing and not finished:
            continue
        runs.append(load_run(p))
    return sorted(runs, key=lambda r: r.name)


# --------------------------------------------------------------------------- loss by position

_START_NAMES = ("bucket_start", "start", "position", "pos", "bucket")
_END_NAMES = ("bucket_end", "end")
_LOSS_NAMES = ("mean_loss", "loss", "mean")
_COUNT_NAMES = ("count", "n", "tokens")


def read_loss_by_position(path: str | Path) -> dict[str, dict[str, list[float]]]:
    """A loss-by-position CSV -> {kind: {"position": [...], "loss": [...], "count": [...]}}.

    The eval part writes columns kind (window | document), bucket_start, bucket_end, count,
    mean_loss; without a kind column every row is kind "all". Columns are matched by name
    (bucket_start/start/position, bucket_end/end, mean_loss/loss/mean, count/n/tokens). The
    position is the bucket centre (start + end - 1) / 2, except for the log2 ``document``
    buckets and open-ended ones, which are placed at their start.
    Rows with a zero count or a non-finite loss are dropped.
    """
    path = Path(path)
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    if not rows:
        raise ValueError(f"{path}: empty loss-by-position CSV")
    cols = {c.strip().lower(): c for c in rows[0].keys() if c is not None}

    def pick(names: Sequence[str], required: bool) -> str | None:
        for n in names:
            if n in cols:
                return cols[n]
        if required:
            raise ValueError(f"{path}: no column among {', '.join(names)} (found: {', '.join(cols)})")
        return None

    c_start, c_loss = pick(_START_NAMES, True), pick(_LOSS_NAMES, True)
    c_end, c_count, c_kind = pick(_END_NAMES, False), pick(_COUNT_NAMES, False), pick(("kind",), False)

    def num(row: dict, col: str | None) -> float:
        v = row.get(col) if col else None
        return math.nan if v in ("", None) else float(v)

    out: dict[str, dict[str, list[float]]] = {}
    for i, row in enumerate(rows, start=2):
        try:
            start, end, value, n = num(row, c_start), num(row, c_end), num(row, c_loss), num(row, c_count)
        except ValueError:
            raise ValueError(f"{path}:{i}: non-numeric value in row {row}") from None
        if not math.isfinite(value) or n == 0 or math.isnan(start):
            continue
        kind = str(row.get(c_kind) or "all") if c_kind else "all"
        curve = out.setdefault(kind, {"position": [], "loss": [], "count": []})
        # Log2 document buckets are drawn at their start (0, 1, 2, 4, ...), linear ones at the centre.
        centre = kind != "document" and math.isfinite(end)
        curve["position"].append((start + end - 1) / 2.0 if centre else start)
        curve["loss"].append(value)
        curve["count"].append(n)
    return out


# --------------------------------------------------------------------------- tables


def run_table(runs: Sequence[Run], columns: Sequence[str] | None = None) -> tuple[list[str], list[dict]]:
    """Columns (the requested ones, or the defaults plus every ``val/*`` metric) and one row per run.

    Default columns that no run has are dropped; requested columns are kept even if empty.
    """
    if columns is None:
        val_keys = sorted({k for r in runs for k in r.metrics if k.startswith("val/")})
        columns = [c for c in DEFAULT_COLUMNS if any(r.has(c) for r in runs)] + val_keys
    rows = [{c: r.get(c) for c in columns} for r in runs]
    return list(columns), rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def table_markdown(columns: Sequence[str], rows: Sequence[dict]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(out) + "\n"


def table_csv(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def write_run_table(runs: Sequence[Run], out_dir: str | Path, columns: Sequence[str] | None = None) -> list[Path]:
    """Write ``runs.md`` and ``runs.csv`` into ``out_dir`` (atomically); returns their paths."""
    cols, rows = run_table(runs, columns)
    out_dir = Path(out_dir)
    md, cs = out_dir / "runs.md", out_dir / "runs.csv"
    atomic_write_text(md, table_markdown(cols, rows))
    atomic_write_text(cs, table_csv(cols, rows))
    return [md, cs]


def points_by_group(
    runs: Sequence[Run],
    x_key: str,
    y_key: str,
    group_key: str | None = None,
    reduce: str = "best",
) -> dict[str, tuple[list[float], list[float]]]:
    """Group runs by ``group_key`` and collect (x, y) per group, one y per x.

    Several runs at the same x (a tuning sweep, seeds) are reduced: ``best`` (minimum y: the
    tuned point, as the megadocs plots do), ``mean`` (seeds) or ``all`` (keep every run).
    Runs lacking x or y are errors naming the run.
    """
    if reduce not in ("best", "mean", "all"):
        raise ValueError(f"reduce must be best, mean or all, got {reduce!r}")
    raw: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        g = _fmt(r.get(group_key)) if group_key else "all"
        raw.setdefault(g, []).append((r.number(x_key), r.number(y_key)))
    out = {}
    for g, pts in sorted(raw.items()):
        if reduce == "all":
            pts = sorted(pts)
        else:
            by_x: dict[float, list[float]] = {}
            for x, y in pts:
                by_x.setdefault(x, []).append(y)
            agg = min if reduce == "best" else (lambda v: sum(v) / len(v))
            pts = [(x, agg(ys)) for x, ys in sorted(by_x.items())]
        out[g] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def read_points_csv(
    path: str | Path, x_col: str = "x", y_col: str = "loss", group_col: str | None = "group"
) -> dict[str, tuple[list[float], list[float]]]:
    """(x, loss) points from a CSV, grouped by ``group_col`` when that column exists."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    for col in (x_col, y_col):
        if col not in rows[0]:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(rows[0])}); set --x-col/--y-col")
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, row in enumerate(rows, start=2):
        g = row.get(group_col) if group_col and group_col in row else "all"
        try:
            x, y = float(row[x_col]), float(row[y_col])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{i}: non-numeric {x_col}/{y_col} ({row[x_col]!r}, {row[y_col]!r})") from None
        xs, ys = out.setdefault(str(g), ([], []))
        xs.append(x)
        ys.append(y)
    return out
