"""A short real training run (run.train on the demo): TensorBoard tags, CSVs and metrics.json hold
every named set; tools/evaluate.py reproduces the run's validation losses, ensembles copies of
the checkpoint to the same numbers, scores tasks and refuses a leaky validation set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megadoc_pl.recipes import load_recipe

from helpers import load_script

SETS = ("iid", "long", "short")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from megadoc_pl.train.run import train

    root = tmp_path_factory.mktemp("e2e")
    task = root / "toy.jsonl"
    task.write_text(json.dumps({"question": "Who founded the town?", "choices": ["a river", "the founder"], "label": 1})
                    + "\n")
    cfg = load_recipe("baseline_real", [
        f"eval.tasks.toy={task}", "eval.downstream_every=2",
        "demo.num_documents=240", "data.seq_len=64", "data.val.num_iid=12", "data.val.num_long=6",
        "data.val.num_short=6", "data.val.long_threshold=64", "data.val.short_threshold=64",
        "data.val.max_windows=3", "data.val.interval=2", "train.max_steps=3", "train.global_batch_size=4",
        "train.micro_batch_size=4", "train.accelerator=cpu", f"run.root={root}/runs", "run.name=r0",
        f"data.cache_dir={root}/cache",
    ])
    return train(cfg, {"enable_progress_bar": False, "enable_model_summary": False})


def test_tensorboard_csv_and_metrics_json_hold_every_set(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in SETS:
        assert f"val/{name}/loss" in ea.Tags()["scalars"]
        assert f"val/{name}/loss_by_position" in ea.Tags()["images"]
        final = ea.Scalars(f"val/{name}/loss")[-1].value
        assert metrics[f"val/{name}/loss"] == pytest.approx(final, rel=1e-6)
        assert (run_dir / f"loss_by_position_{name}.csv").is_file()
    # downstream: every 2 steps and at the end (step 3), in TensorBoard and metrics.json
    assert [e.step for e in ea.Scalars("downstream/toy/acc")] == [2, 3]
    for key in ("downstream/toy/acc", "downstream/toy/acc_norm", "downstream/avg_error"):
        assert metrics[key] == pytest.approx(ea.Scalars(key)[-1].value)


def _evaluate(args: list[str], capsys) -> tuple[int, dict, str]:
    rc = load_script("tools/evaluate.py").main(args + ["--quiet", "--device", "cpu"])
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if rc == 0 else {}), out.err


def test_evaluate_reproduces_the_run_and_ensembles_copies(run_dir, tmp_path, capsys):
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    task = tmp_path / "toy.jsonl"
    task.write_text(json.dumps({"question": "Who founded the town?", "choices": ["a river", "the founder"], "label": 1})
                    + "\n")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rc, single, err = _evaluate(["--checkpoint", ckpt, "--tasks", f"toy={task}", "--out", str(tmp_path / "e.json")],
                                capsys)
    assert rc == 0, err
    for name in SETS:
        assert single["metrics"][f"val/{name}/loss"] == pytest.approx(metrics[f"val/{name}/loss"], rel=1e-6)
    assert set(single["metrics"]) >= {"downstream/toy/acc", "downstream/toy/acc_norm", "downstream/avg_error"}
    assert json.loads((tmp_path / "e.json").read_text()) == single

    rc, ens, err = _evaluate(["--checkpoint", ckpt, ckpt, "--ensemble", "prob", "--config", str(run_dir / "config.yaml"),
                              "--sets", "iid"], capsys)
    assert rc == 0, err
    assert ens["members"] == 2 and ens["ensemble"] == "prob"
    assert ens["metrics"]["val/iid/loss"] == pytest.approx(single["metrics"]["val/iid/loss"], rel=1e-5)


def test_evaluate_refuses_a_validation_set_overlapping_training(run_dir, capsys):
    from megadoc_pl.data.prepare import prepare_corpus
    from megadoc_pl.demo import corpus_inputs
    from megadoc_pl.eval.runner import load_recipe_file

    # the demo world's documents file: training documents and held-out ones, same ids
    cfg = load_recipe_file(run_dir / "config.yaml")
    world = prepare_corpus(cfg, corpus_inputs(cfg)).paths["real"]
    rc, _, err = _evaluate(["--checkpoint", str(run_dir / "checkpoints" / "last.ckpt"),
                            "--set", f"data.val.extra.dup={world}", "--sets", "dup"], capsys)
    assert rc == 2
    assert err.startswith("error: held-out hygiene: validation set 'dup' shares ")
    assert err.count("\n") == 1


def test_export_of_a_demo_run_finds_the_demo_tokenizer(run_dir, tmp_path):
    """A demo recipe has no data.tokenizer; the export takes the demo's own tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megadoc_pl.checkpoints import export_checkpoint, load_model_from_checkpoint

    out = export_checkpoint(run_dir / "checkpoints" / "last.ckpt", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    ids = torch.tensor([tok("The town was founded by a miller.").input_ids])
    with torch.no_grad():
        ref = ours.logits(ours(ids.long()))
        got = hf(ids).logits
    assert torch.allclose(got, ref, atol=1e-4)
