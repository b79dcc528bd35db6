"""The ``megadoc-pl`` LightningCLI: recipe flags, --print_config, fit and validate in process."""

from __future__ import annotations

import json

import pytest
import yaml

from megadoc_pl.train.cli import main

from conftest import one_thread
from train_helpers import tiny_overrides, write_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_print_config_shows_the_resolved_recipe_and_trainer(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--recipe", "megadoc_stitch", "--scale", "demo", "--set", "train.lr=0.01",
              "--set", "train.grad_clip=0.5", "--trainer.devices", "3", "--print_config"])
    assert e.value.code in (0, None)
    out = yaml.safe_load(capsys.readouterr().out)
    rc = out["recipe_config"]
    assert rc["recipe"] == "megadoc_stitch" and rc["scale"] == "demo"
    assert rc["train"]["lr"] == 0.01 and rc["data"]["view"] == "stitch"
    t = out["trainer"]
    # recipe-derived defaults, then the explicit flag on top
    assert t["gradient_clip_val"] == 0.5 and t["precision"] in ("32-true", "bf16-mixed")
    assert str(t["devices"]) == "3"
    assert t["use_distributed_sampler"] is False and t["check_val_every_n_epoch"] is None
    assert out["set"] == ["train.lr=0.01", "train.grad_clip=0.5"]


def test_print_config_round_trips_through_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--recipe", "rephrase", "--set", "data.generations=8", "--trainer.num_nodes", "2", "--print_config"])
    first = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "run.yaml"), "--print_config"])
    again = yaml.safe_load(capsys.readouterr().out)
    first = yaml.safe_load(first)
    assert again["recipe_config"] == first["recipe_config"]
    assert again["recipe_config"]["recipe"] == "rephrase" and again["recipe_config"]["data"]["generations"] == 8
    assert again["trainer"]["num_nodes"] == 2


def test_bad_recipe_is_one_line():
    with pytest.raises(SystemExit) as e:
        main(["fit", "--recipe", "no_such_recipe"])
    assert str(e.value).startswith("error: unknown recipe 'no_such_recipe'; available:")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--recipe", "baseline_real", "--set", "train.no_such_key=1"])
    assert "unknown key" in str(e.value) and "\n" not in str(e.value)


def test_fit_then_validate_last_checkpoint(tmp_path, tiny_tokenizer_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sets = _sets(tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "cli", steps=3))
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "--recipe", "baseline_real", *sets, *quiet, "--trainer.max_steps", "2"])
    run_dir = tmp_path / "runs" / "cli"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 2 and m["max_steps"] == 2
    assert "max_steps: 2" in (run_dir / "config.yaml").read_text()  # the flag went back into the recipe
    capsys.readouterr()

    main(["validate", "--recipe", "baseline_real", *sets, *quiet, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    values = json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out[out.index("{"):])
    assert set(values) == {"val/iid/loss", "val/long/loss", "val/short/loss"}
    for k, v in values.items():
        assert v == pytest.approx(m[k], rel=1e-6)

    # fitting the same run again without --resume is refused; --resume of a finished run is a no-op
    with pytest.raises(SystemExit, match="already holds a trained run"):
        main(["fit", "--recipe", "baseline_real", *sets, *quiet, "--trainer.max_steps", "2"])
