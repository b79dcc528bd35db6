"""The ``megadoc-pl`` LightningCLI: recipe flags, --print_config, fit and validate in process."""

from __future__ import annotations

import json

import pytest
import yaml

from megadoc_pl.config import RecipeConfig
from megadoc_pl.train.cli import TRAINER_LINKS, main

from helpers import one_thread
from helpers import tiny_overrides, write_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _print_config(argv, capsys) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv + ["--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_resolved_recipe_and_links_the_trainer(capsys):
    out = _print_config(["fit", "--recipe", "megadoc_stitch", "--scale", "demo", "--set", "train.lr=0.01",
                         "--set", "train.grad_clip=0.5", "--trainer.devices", "3",
                         "--trainer.enable_progress_bar", "false"], capsys)
    cfg = out["cfg"]
    assert cfg["recipe"] == "megadoc_stitch" and cfg["scale"] == "demo"
    assert cfg["train"]["lr"] == 0.01 and cfg["data"]["view"] == "stitch" and cfg["train"]["grad_clip"] == 0.5
    assert cfg["train"]["devices"] == 3  # --trainer.devices is a spelling of the recipe key
    # linked Trainer settings have one value, the recipe's: they are not a second place to set them
    assert not set(TRAINER_LINKS) & set(out["trainer"])
    assert out["trainer"]["enable_progress_bar"] is False


def test_config_and_set_compose_in_command_line_order(tmp_path, capsys):
    first = _print_config(["fit", "--recipe", "rephrase", "--set", "data.generations=8", "--set", "train.num_nodes=2"],
                          capsys)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(first))
    again = _print_config(["fit", "--config", str(path)], capsys)
    assert again["cfg"] == first["cfg"]
    assert again["cfg"]["recipe"] == "rephrase" and again["cfg"]["data"]["generations"] == 8
    assert again["cfg"]["train"]["num_nodes"] == 2
    later = _print_config(["fit", "--config", str(path), "--set", "train.lr=0.5"], capsys)
    assert later["cfg"]["train"]["lr"] == 0.5
    earlier = _print_config(["fit", "--set", "train.lr=0.5", "--config", str(path)], capsys)
    assert earlier["cfg"]["train"]["lr"] == first["cfg"]["train"]["lr"]  # the later file wins


def test_help_explains_every_recipe_key(capsys):
    import dataclasses

    from megadoc_pl.config import field_docs

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs()

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            yield from leaves(sub, f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else [prefix + f.name]

    undocumented = [k for k in leaves(RecipeConfig) if not docs.get(k)]
    assert not undocumented, f"recipe keys without an attribute docstring: {undocumented}"
    missing = [k for k in leaves(RecipeConfig)
               if f"--cfg.{k} " not in text or " ".join(docs[k].split()[:4]) not in text]
    assert not missing, f"keys without a flag and its sentence in --help: {missing}"


@pytest.mark.parametrize("override, words", [
    ("model.size=300mm", "unknown model size '300mm'"),
    ("model.attention_backend=xformers", "xformers"),
    ("train.lr=-1", "train.lr=-1.0: must be > 0"),
    ("data.view=stitchh", "stitchh"),
])
def test_recipe_typos_fail_up_front_in_one_line_without_a_run_directory(tmp_path, capsys, override, words):
    capsys.readouterr()
    where = ["--set", f"run.root={tmp_path}/runs", "--set", f"data.cache_dir={tmp_path}/cache"]
    key, value = override.split("=", 1)
    for argv in (["fit", "--recipe", "megadoc_stitch", *where, "--set", override],
                 ["fit", "--recipe", "megadoc_stitch", *where, f"--cfg.{key}", value]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    # refused before data preparation (no cache) and before a run directory exists
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_bad_arguments_are_one_line(capsys):
    capsys.readouterr()
    assert main(["fit", "--recipe", "no_such_recipe"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown recipe 'no_such_recipe'; available:")
    assert main(["fit", "--recipe", "baseline_real", "--set", "train.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key" in err and len(err.strip().splitlines()) == 1
    assert main(["fit", "--recipe", "baseline_real", "--trainer.no_such_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert "no_such_flag" in err and "--help" in err and len(err.strip().splitlines()) == 1


def test_fit_then_validate_last_checkpoint(tmp_path, tiny_tokenizer_path, capsys, monkeypatch):
    from megadoc_pl import recipes

    validated = []  # the front door checks each recipe once; the library takes it as checked
    real_validate = recipes.validate_recipe
    monkeypatch.setattr(recipes, "validate_recipe", lambda cfg: (validated.append(cfg.run.name), real_validate(cfg)))
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    sets = _sets(tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "cli", steps=3))
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    main(["fit", "--recipe", "baseline_real", *sets, *quiet, "--trainer.max_steps", "2"])
    assert validated == ["cli"]
    run_dir = tmp_path / "runs" / "cli"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "finished" and m["steps"] == 2 and m["max_steps"] == 2
    assert "max_steps: 2" in (run_dir / "config.yaml").read_text()  # the flag went back into the recipe
    # a printed config, given back with --set after it, trains at the --set value
    cfg_file = tmp_path / "cli.yaml"
    cfg_file.write_text(yaml.safe_dump(_print_config(["fit", "--recipe", "baseline_real", *sets], capsys)))
    validated.clear()
    assert main(["fit", "--config", str(cfg_file), "--set", "run.name=cli-lr", "--set", "train.lr=0.5",
                 "--set", "train.max_steps=1", *quiet]) == 0
    assert validated == ["cli-lr"]  # a --config recipe: checked once parsed, not before
    lr = _scalars(tmp_path / "runs" / "cli-lr", "train/lr")
    assert max(lr) == pytest.approx(0.5) and "lr: 0.5" in (tmp_path / "runs" / "cli-lr" / "config.yaml").read_text()
    capsys.readouterr()

    main(["validate", "--recipe", "baseline_real", *sets, *quiet, "--ckpt_path", "last"])
    out = capsys.readouterr().out
    values = json.loads(out[out.rindex("\n{") + 1:] if "\n{" in out else out[out.index("{"):])
    assert set(values) == {"val/iid/loss", "val/long/loss", "val/short/loss"}
    for k, v in values.items():
        assert v == pytest.approx(m[k], rel=1e-6)

    # fitting the same run again without --resume is refused; --resume of a finished run is a no-op
    capsys.readouterr()
    assert main(["fit", "--recipe", "baseline_real", *sets, *quiet, "--trainer.max_steps", "2"]) == 2
    assert "already holds a trained run" in capsys.readouterr().err


def _scalars(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)]


def test_cross_key_checks_see_the_config_file(tmp_path, capsys):
    """A --set that is valid only with a key from --config (sharded checkpoints need fsdp2) is not refused
    by the early check of --recipe/--set alone; the whole recipe is checked once parsed."""
    base = _print_config(["fit", "--recipe", "baseline_real", "--set", "train.strategy=fsdp2"], capsys)
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(base))
    out = _print_config(["fit", "--config", str(path), "--set", "train.sharded_checkpoints=true"], capsys)
    assert out["cfg"]["train"]["strategy"] == "fsdp2" and out["cfg"]["train"]["sharded_checkpoints"] is True
    assert main(["fit", "--recipe", "baseline_real", "--set", "train.sharded_checkpoints=true"]) == 2
    assert "needs train.strategy=fsdp2" in capsys.readouterr().err
