"""Data efficiency: exact inversion, exact multipliers on constructed points, the CLI, the example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megadoc_pl.analysis import efficiency as E
from megadoc_pl.analysis.fits import PowerLaw
from helpers import load_script

LAW = PowerLaw(300.0, 0.24, 1.9)
D_REAL = 203_867_748
SIZES = [209.7e6, 419.4e6, 838.9e6, 1.68e9]  # the predecessor's baseline data sizes


def test_inversion_is_exact_on_a_constructed_law():
    for d in (1e6, D_REAL, 3.7e9, 1e12):
        assert E.effective_tokens(LAW, float(LAW(d))) == pytest.approx(d, rel=1e-12)
    # by hand: (A / (L - E))^(1/alpha)
    assert E.effective_tokens(LAW, 3.0) == pytest.approx((300.0 / 1.1) ** (1 / 0.24), rel=1e-14)


def test_below_the_asymptote_is_an_error():
    with pytest.raises(ValueError, match="below the asymptote"):
        E.effective_tokens(LAW, 1.9)
    with pytest.raises(ValueError, match="method 'x'.*below the asymptote"):
        E.data_efficiency(LAW, {"x": 1.5}, D_REAL)


def test_multipliers_exact_on_constructed_points():
    """Baseline runs exactly on the law; methods at the loss the law gives for k * D_real."""
    fit = E.fit_data_law(SIZES, [float(LAW(d)) for d in SIZES], n_boot=100, seed=0)
    assert (fit.law.A, fit.law.B, fit.law.C) == pytest.approx((300.0, 0.24, 1.9), rel=1e-6)
    ks = {"x1.48": 1.48, "x1.8": 1.80, "x3": 3.0}
    rows = E.data_efficiency(fit, {n: float(LAW(k * D_REAL)) for n, k in ks.items()}, D_REAL)
    for row, k in zip(rows, ks.values()):
        assert row.multiplier == pytest.approx(k, rel=1e-6)
        assert row.d_eff == pytest.approx(k * D_REAL, rel=1e-6)
        assert row.multiplier_lo <= k * (1 + 1e-6) and row.multiplier_hi >= k * (1 - 1e-6)
        assert row.n_replicates == 100 and row.n_unbounded == 0
    # a given law: the same numbers, no intervals
    given = E.data_efficiency(LAW, {"a": float(LAW(2 * D_REAL))}, D_REAL)[0]
    assert given.multiplier == pytest.approx(2.0, rel=1e-12) and np.isnan(given.multiplier_lo)


def test_reference_loss_definition():
    """Predecessor's definition: D_eff(L_method) / D_eff(L_baseline)."""
    base_loss = float(LAW(D_REAL)) + 0.01  # a baseline that sits off the law
    row = E.data_efficiency(LAW, {"m": float(LAW(2 * D_REAL))}, D_REAL, reference_loss=base_loss)[0]
    assert row.multiplier == pytest.approx(2 * D_REAL / LAW.inverse(base_loss), rel=1e-12)


def test_law_through_point_and_parameter_checks():
    law = E.law_through_point(0.24, 1.9, D_REAL, 3.5544)
    assert float(law(D_REAL)) == pytest.approx(3.5544, rel=1e-14)
    with pytest.raises(ValueError, match="above the asymptote"):
        E.law_through_point(0.24, 3.6, D_REAL, 3.5544)
    with pytest.raises(ValueError, match="alpha"):
        E.law_from_params(1.0, -0.2, 1.0)


def test_loss_samples_below_the_asymptote_give_unbounded_intervals():
    samples = [2.5, 2.0, 1.8, 1.95, 2.2]  # 1.8 is below E = 1.9
    row = E.efficiency_of_loss_samples(LAW, "m", 2.1, samples, D_REAL, level=0.9)
    assert row.n_unbounded == 1 and row.d_eff_hi == np.inf
    assert row.d_eff == pytest.approx(LAW.inverse(2.1))
    assert row.d_eff_lo == pytest.approx(LAW.inverse(2.5))


def test_efficiency_cli(tmp_path, capsys):
    main = load_script("tools/fit_scaling.py").main
    out = tmp_path / "eff.json"
    main(["efficiency", "--law-through", f"0.24,1.9,{D_REAL},3.5544", "--loss", "simple=3.41", "stitched=3.384",
          "--d-real", str(D_REAL), "--json", str(out)])
    def strict(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    rows = {r["name"]: r for r in json.loads(out.read_text(), parse_constant=strict)["methods"]}
    assert rows["simple"]["multiplier_lo"] is None  # a given law has no interval: null, not NaN
    for name, loss in (("simple", 3.41), ("stitched", 3.384)):
        expect = ((3.5544 - 1.9) / (loss - 1.9)) ** (1 / 0.24)
        assert rows[name]["multiplier"] == pytest.approx(expect, rel=1e-12)
    assert "1.463x" in capsys.readouterr().out

    csv_path = tmp_path / "base.csv"
    csv_path.write_text("tokens,loss\n" + "".join(f"{d},{LAW(d)}\n" for d in SIZES))
    main(["efficiency", "--baseline-csv", str(csv_path), "--loss", f"m={LAW(1.5 * D_REAL)}",
          "--d-real", str(D_REAL), "--n-boot", "50", "--json", str(out)])
    (row,) = json.loads(out.read_text())["methods"]
    assert row["multiplier"] == pytest.approx(1.5, rel=1e-6)
    with pytest.raises(SystemExit, match="below the asymptote"):
        main(["efficiency", "--law", "300,0.24,1.9", "--loss", "m=1.0", "--d-real", "1e8"])


def test_megadocs_worked_example_runs_and_reports_the_multipliers(tmp_path):
    from megadoc_pl.analysis import worked_example as W

    text = W.run(tmp_path, n_boot=200)
    simple32 = ((W.BASELINE_LOSS - W.LAW_E) / (3.410 - W.LAW_E)) ** (1 / W.LAW_ALPHA)
    assert f"| simple G=32 | 3.4100 | 2.039e+08 | {simple32 * D_REAL:.4g} | {simple32:.3f}x |" in text
    assert "| real only (check) | 3.5544 | 2.039e+08 | 2.039e+08 | 1.000x |" in text
    assert "| 32 | 3.410 | 3.384 | 0.026 |" in text
    for name in ("megadocs_loss_vs_G.png", "megadocs_loss_vs_epochs.png", "megadocs_fits.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_docs_show_the_current_worked_example_output():
    """docs/analysis.md pastes the example's output; it must still be what the code prints."""
    from pathlib import Path

    from megadoc_pl.analysis import worked_example as W

    doc = (Path(__file__).resolve().parents[2] / "docs" / "analysis.md").read_text()
    for line in W.run(None).splitlines():  # defaults: n_boot 2000, seed 0, as in the doc
        assert line in doc, f"docs/analysis.md is stale; rerun the example and paste: {line!r}"


def test_efficiency_cli_from_run_directories(tmp_path):
    """Baseline runs at four real-data sizes (D derived from tokens seen / passes) and a method run."""
    root = tmp_path / "runs"
    for d in SIZES:
        run = root / f"real_{d:.0f}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"val/iid/loss": float(LAW(d)), "train/tokens/real": 16 * d, "train/passes/real": 16.0}))
    method = root / "stitch"
    method.mkdir()
    (method / "metrics.json").write_text(json.dumps({"val/iid/loss": float(LAW(1.8 * D_REAL))}))
    out = tmp_path / "eff.json"
    load_script("tools/fit_scaling.py").main(["efficiency", "--baseline", *(str(root / f"real_{d:.0f}") for d in SIZES),
                                   "--methods", str(method), "--d-real", str(D_REAL), "--n-boot", "50",
                                   "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["law"] == pytest.approx({"A": 300.0, "B": 0.24, "C": 1.9}, rel=1e-6)
    (row,) = result["methods"]
    assert row["name"] == "stitch" and row["multiplier"] == pytest.approx(1.8, rel=1e-6)
