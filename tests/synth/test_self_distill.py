"""Self-distillation baseline end to end on CPU: a tiny real-only teacher is trained, its checkpoint
continues document prefixes raw (task ``self_distill``, transformers backend, no chat template),
the rows cite the teacher, and the ``self_distill`` recipe trains on them."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from megadoc_pl.utils import json_fingerprint, sha256_file

from helpers import build_tiny_tokenizer, load_script, one_thread
from helpers import QUIET, tiny_overrides, tiny_recipe, write_corpus

G, PREFIX, NEW = 2, 6, 12


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(out.glob("shard-*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A real-only teacher trained for a few steps, and self_distill rows sampled from its checkpoint.

    The validation split is fixed first (data.val.split_file) and shared by teacher, generation
    and student, as for every generation task: held-out documents never seed a continuation."""
    from megadoc_pl.synth.runner import SynthRunConfig, synthesize
    from megadoc_pl.synth.tasks import TaskConfig
    from megadoc_pl.train.run import train

    root = tmp_path_factory.mktemp("sd")
    corpus = write_corpus(root / "real" / "docs.jsonl", num_docs=40)
    tok = build_tiny_tokenizer(root / "tok")
    split = root / "split.json"
    with one_thread():
        run_dir = train(tiny_recipe(corpus, tok, root, "teacher", 4, [f"data.val.split_file={split}"]), QUIET)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        out = root / "gen"
        stats = synthesize(TaskConfig(task="self_distill", generations=G, prefix_tokens=PREFIX, max_new_tokens=NEW),
                           SynthRunConfig(inputs=[str(corpus)], out=str(out), backend="transformers",
                                     backend_kwargs={"model": str(ckpt), "raw": True, "device": "cpu"},
                                     model=str(ckpt), split_file=str(split), progress=False))
    return {"root": root, "corpus": corpus, "tok": tok, "ckpt": ckpt, "out": out, "stats": stats, "split": split}


def test_rows_are_raw_continuations_citing_the_teacher(teacher):
    from megadoc_pl.data.split import load_heldout_ids

    ckpt, out = teacher["ckpt"], teacher["out"]
    heldout = set(load_heldout_ids(teacher["split"]))
    docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in teacher["corpus"].read_text().splitlines()}
    docs = {k: v for k, v in docs.items() if k not in heldout}
    rows = _rows(out)
    assert heldout and teacher["stats"]["totals"]["failures"] == 0
    assert teacher["stats"]["totals"]["heldout_skipped"] == len(heldout)
    assert sorted((r["source_id"], r["gen_index"]) for r in rows) == sorted((d, g) for d in docs for g in range(G))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    expect = {"path": str(ckpt.resolve()), "checkpoint": str(ckpt.resolve()), "sha256": sha256_file(ckpt),
              "step": 4, "recipe_sha256": json_fingerprint(saved["hyper_parameters"]["cfg"])}
    assert saved["global_step"] == 4
    grew = 0
    for r in rows:
        assert r["task"] == "self_distill" and r["prompt_version"] == "raw-prefix/v1"
        assert {k: r["teacher"][k] for k in expect} == expect and len(r["teacher"]["weights_sha256"]) == 64
        assert r["model"] == str(ckpt.resolve())
        assert r["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": NEW, "n": G, "seed": r["sampling"]["seed"]}
        prefix = r["text"][: r["prefix_chars"]]
        assert docs[r["source_id"]].startswith(prefix) and r["prefix_tokens"] == PREFIX
        assert 1 <= r["completion_tokens"] <= NEW and r["finish_reason"] in ("stop", "length")
        grew += len(r["text"]) > len(prefix)
    assert grew > len(rows) // 2  # sampled text follows the prefix
    # The G samples of one prompt differ (temperature 1, one request with n = G).
    by_doc: dict[str, set] = {}
    for r in rows:
        by_doc.setdefault(r["source_id"], set()).add(r["text"])
    assert sum(len(v) == G for v in by_doc.values()) > len(by_doc) // 2
    run = json.loads((out / ".synth" / "run.json").read_text())
    assert run["task"] == "self_distill" and run["prefix_tokens"] == PREFIX and run["teacher_sha256"] == expect["sha256"]
    assert run["teacher"]["step"] == 4 and json_fingerprint(run["teacher"]["recipe"]) == expect["recipe_sha256"]


def test_greedy_continuation_equals_our_model_and_export_cites_the_checkpoint(teacher, tmp_path):
    """temperature 0 through the CLI, from the HF export: the continuation is our Llama's greedy
    decode of BOS + the prefix tokens (no chat template), and the export names the checkpoint."""
    from transformers import AutoTokenizer

    from megadoc_pl.checkpoints import load_model
    from megadoc_pl.data.tokenizer import load_tokenizer
    from megadoc_pl.synth.cli import main

    export = tmp_path / "hf"
    assert load_script("tools/export_hf.py").main(["--checkpoint", str(teacher["ckpt"]), "--out", str(export)]) == 0
    out = tmp_path / "greedy"
    argv = ["--task", "self_distill", "--backend", "transformers", "--model", str(export), "--input",
            str(teacher["corpus"]), "--out", str(out), "--generations", "1", "--temperature", "0",
            "--prefix-tokens", str(PREFIX), "--max-new-tokens", str(NEW), "--limit", "3", "--no-progress",
            "--split-file", str(teacher["split"])]
    with one_thread():
        assert main(argv) == 0
        rows = _rows(out)
        assert len(rows) == 3
        model = load_model(teacher["ckpt"]).model  # in eval mode
        info, hf_tok = load_tokenizer(teacher["tok"]), AutoTokenizer.from_pretrained(export)
        prompt_tokens = 0
        for r in rows:
            assert r["teacher"]["sha256"] == sha256_file(teacher["ckpt"]) and r["teacher"]["step"] == 4
            assert r["teacher"]["path"] == str(export.resolve())
            ids = [info.bos_id] + info.encode(r["text"][: r["prefix_chars"]])
            prompt_tokens += len(ids)
            new = []
            with torch.no_grad():
                for _ in range(NEW):
                    nxt = int(model.lm_head(model(torch.tensor([ids + new]))[0, -1]).argmax())
                    new.append(nxt)
                    if nxt == info.eos_id:
                        break
            assert r["completion_tokens"] == len(new)
            assert r["text"][r["prefix_chars"]:] == hf_tok.decode(new, skip_special_tokens=True)
    # The teacher saw exactly BOS + the prefix tokens: no chat template, nothing re-tokenized.
    assert json.loads((out / "stats.json").read_text())["totals"]["prompt_tokens"] == prompt_tokens == 3 * (1 + PREFIX)


def test_bad_teacher_and_backend_are_one_line_errors(teacher, tmp_path, capsys):
    from megadoc_pl.synth.cli import main

    base = ["--task", "self_distill", "--input", str(teacher["corpus"]), "--no-progress"]
    assert main(base + ["--backend", "transformers", "--model", str(teacher["corpus"]), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "neither a Lightning checkpoint" in err and not (tmp_path / "a" / ".synth" / "run.json").exists()
    assert main(base + ["--backend", "openai", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
                        "--tokenizer", str(teacher["tok"]), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a backend that continues raw token ids" in err


def test_self_distill_recipe_trains_on_the_rows(teacher):
    from megadoc_pl.recipes import load_recipe
    from megadoc_pl.train.run import train

    root = teacher["root"]
    steps, batch, seq_len = 2, 4, 32
    cfg = load_recipe("self_distill", tiny_overrides(teacher["corpus"], teacher["tok"], root, "student", steps)
                      + [f"data.synthetic={teacher['out']}", f"data.generations={G}",
                         f"data.val.split_file={teacher['split']}"])
    assert (cfg.data.view, cfg.data.include_real, cfg.data.mixture.synthetic_fraction) == ("self_distill", False, 0.5)
    with one_thread():
        run_dir = train(cfg, QUIET)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert (m["status"], m["steps"], m["recipe"]) == ("finished", steps, "self_distill")
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["val/iid/loss"])
    synthetic = m["train/tokens/synthetic"]
    assert synthetic == math.floor(steps * batch * Fraction("0.5")) * seq_len > 0
    assert m["train/tokens/real"] + synthetic == steps * batch * seq_len
