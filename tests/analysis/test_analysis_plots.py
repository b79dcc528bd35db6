"""Plots are valid PNGs; run tables and plots from fake run directories; tolerant CSV reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from megadoc_pl.analysis import plots as P
from megadoc_pl.analysis.fits import bootstrap_power_law
from megadoc_pl.analysis.runs import load_runs, read_loss_by_position, run_table, table_markdown
from helpers import load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.01  # something is drawn


def test_each_plot_writes_a_valid_png(tmp_path):
    g = [2, 4, 8, 16, 32]
    series = {"simple": (g, [3.462, 3.446, 3.429, 3.414, 3.410]), "stitched": (g, [3.456, 3.436, 3.417, 3.395, 3.384])}
    fits = {k: bootstrap_power_law(*v, n_boot=50) for k, v in series.items()}
    diff = np.sin(np.arange(100) / 5.0)
    paths = [
        P.plot_loss_vs_generations(series, tmp_path / "g.png", fits=fits, x_offset=0.0, baseline=3.5544),
        P.plot_loss_vs_epochs({"simple G=2": ([2, 4, 8, 16], [3.557, 3.462, 3.464, 3.494])}, tmp_path / "e.png"),
        P.plot_scaling_fits(fits, tmp_path / "f.png", x_label="G"),
        P.plot_loss_by_position({"r1": {"position": [0, 1, 2, 4], "loss": [5, 4, 3.5, 3.2]}}, tmp_path / "p.png",
                                log_x=True),
        P.plot_anomaly_histogram({"edges": list(np.linspace(0, 100, 11)), "counts": [1] * 10, "none": 2},
                                 tmp_path / "h.png"),
        P.plot_loss_diff(diff, np.convolve(diff, np.ones(5) / 5, mode="valid"),
                         {"id": "d", "window": 5, "mean_diff": 0.0, "std_diff": 0.7,
                          "first_anomaly": {"1.0": 3, "2.0": None}},
                         tmp_path / "d.png"),
    ]
    for p in paths:
        assert_png(p)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def fake_run(root, name, recipe, g, epochs, loss, position_csv=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps({
        "val/iid/loss": loss, "val/long/loss": loss + 0.1, "train/loss": loss - 0.2,
        "parameters": 1234, "tokens_seen": 1000 * epochs, "steps": 10 * epochs, "wall_time_s": 1.5}))
    (d / "config.yaml").write_text(yaml.safe_dump({
        "recipe": recipe, "scale": "demo", "run": {"name": name},
        "data": {"view": "stitch" if recipe == "megadoc_stitch" else "rephrase", "generations": g,
                 "mixture": {"real_epochs": epochs, "synthetic_fraction": 0.75}},
        "train": {"lr": 0.003, "weight_decay": 0.4}}))
    if position_csv is not None:
        (d / "loss_by_position_iid.csv").write_text(position_csv)
    return d


POSITION_CSV = (
    "kind,bucket_start,bucket_end,count,mean_loss\n"
    "window,0,16,100,4.5\nwindow,16,32,100,4.0\nwindow,32,48,0,nan\n"
    "document,0,1,10,6.0\ndocument,1,2,10,5.0\ndocument,2,4,20,4.5\ndocument,4,inf,40,4.0\n"
)


def test_read_loss_by_position_is_tolerant(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(POSITION_CSV)
    curves = read_loss_by_position(p)
    assert curves["window"] == {"position": [7.5, 23.5], "loss": [4.5, 4.0], "count": [100, 100]}
    assert curves["document"]["position"] == [0, 1, 2, 4]  # log2 buckets: at their start
    q = tmp_path / "b.csv"
    q.write_text("position,loss\n0,5.0\n10,4.0\n")
    (curve,) = read_loss_by_position(q).values()  # no kind column: one curve "all", no counts
    assert curve["position"] == [0, 10] and curve["loss"] == [5.0, 4.0] and np.isnan(curve["count"]).all()
    r = tmp_path / "c.csv"
    r.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="c.csv: no column among bucket_start"):
        read_loss_by_position(r)


def test_run_table_from_fake_run_dirs(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "b", "rephrase", 4, 8, 3.446)
    fake_run(root, "a", "rephrase", 2, 4, 3.462)
    runs = load_runs(sorted(root.iterdir()))
    cols, rows = run_table(runs)
    assert cols[:5] == ["name", "recipe", "scale", "data.view", "data.generations"]
    assert cols[-2:] == ["val/iid/loss", "val/long/loss"]
    md = table_markdown(cols, rows)
    assert md.splitlines()[2].startswith("| a | rephrase | demo | rephrase | 2 | 4 | 0.75 | 0.003 | 0.4 |")


def test_plot_runs_cli(tmp_path, capsys):
    root = tmp_path / "runs"
    for g, loss_s, loss_b in ((2, 3.462, 3.456), (8, 3.429, 3.417), (32, 3.410, 3.384)):
        fake_run(root, f"s{g}", "rephrase", g, 16, loss_s, POSITION_CSV)
        fake_run(root, f"b{g}", "megadoc_stitch", g, 32, loss_b)
    fake_run(root, "s32-E8", "rephrase", 32, 8, 3.422)
    fake_run(root, "s32-E32", "rephrase", 32, 32, 3.423)
    fake_run(root, "s32-E32-worse", "rephrase", 32, 32, 3.5)  # a worse run at the same point: not plotted
    (root / "unfinished").mkdir()
    out = tmp_path / "report"
    load_script("tools/plot_runs.py").main([*map(str, sorted(root.iterdir())), "--out", str(out)])
    text = capsys.readouterr().out
    assert "9 runs" in text
    csv_lines = (out / "runs.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,recipe,scale,data.view,data.generations,data.mixture.real_epochs")
    assert len(csv_lines) == 10 and any(line.startswith("b32,megadoc_stitch,demo,stitch,32,32,") for line in csv_lines)
    assert (out / "runs.md").read_text().count("\n") == 11
    for name in ("loss_vs_generations.png", "loss_vs_epochs.png", "loss_by_position_iid_window.png",
                 "loss_by_position_iid_document.png"):
        assert_png(out / name)
    # nothing to plot: a note, no file
    lone = tmp_path / "lone"
    fake_run(lone, "only", "rephrase", 2, 4, 3.5)
    load_script("tools/plot_runs.py").main([str(lone / "only"), "--out", str(tmp_path / "r2")])
    assert "skipped loss_vs_generations" in capsys.readouterr().out
    assert not (tmp_path / "r2" / "loss_vs_generations.png").exists()
