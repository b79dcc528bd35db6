"""MAGA tool models on CPU: judged runs -> SFT set -> fine-tuning -> int8 model -> runner -> Table 1.

The teacher is the demo's template backend (deterministic pairs, reformulations and judge
scores: Base scores 5, Relaxed 2), the student a tiny random Llama (synth/tiny.py). Quality is
not the point: the filter's exact counts, the completion mask, the quantized layers, the runner
plumbing and the report are.
"""

import inspect
import json
import sys

import pytest
import torch

from megadoc_pl.demo.template_backend import TEMPLATE_VERSION
from megadoc_pl.demo.world import write_world
from megadoc_pl.errors import MissingDependency
from megadoc_pl.synth import maga
from megadoc_pl.synth.cli import main as synthesize_main
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model
from megadoc_pl.synth.toolmodel import quantize as tq
from megadoc_pl.synth.toolmodel.cli import main as toolmodel_main
from megadoc_pl.synth.toolmodel.dataset import DatasetConfig, build_dataset, load_examples
from megadoc_pl.synth.toolmodel.report import compare, format_table, seed_pairs
from megadoc_pl.synth.toolmodel.sft import IGNORE_INDEX, SFTConfig, collate, encode_example, train_tool_model

torch.set_num_threads(1)
G = 2  # pairs per document


def _rows_path(d):
    return d / "shard-00000-of-00001.jsonl"


def _edit_rows(d, edits):
    """Set fields of teacher rows {(doc index, gen_index): fields} (test data: mixed judge outcomes)."""
    rows = [json.loads(x) for x in _rows_path(d).read_text().splitlines()]
    for r in rows:
        r.update(edits.get((r["source_id"], r["gen_index"]), {}))
    _rows_path(d).write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """11 documents (10 demo docs + a copy of doc 0 under another id), doc 0 and 1 held out,
    a Base teacher run (scores 5, one row set to 2, one unjudged) and a Relaxed one (scores 2)."""
    tmp = tmp_path_factory.mktemp("toolmodel")
    docs_path = write_world(tmp / "docs.jsonl", 0, 10)
    docs = [json.loads(x) for x in docs_path.read_text().splitlines()]
    docs.append({**docs[0], "id": "copy-of-doc0"})
    docs_path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    ids = [d["id"] for d in docs]
    (tmp / "split.json").write_text(json.dumps({"seed": 0, "heldout": ids[:2], "sets": {"iid": ids[:2]}}))
    for variant in ("base", "relaxed"):
        synthesize(TaskConfig(task="maga", judge=True, generations=G, maga_variant=variant),
                   SynthRunConfig(inputs=[str(docs_path)], out=str(tmp / variant), backend="template", progress=False))
    _edit_rows(tmp / "base", {(ids[2], 1): {"judge_score": 2}, (ids[3], 0): {"judge_score": None}})
    return {"tmp": tmp, "docs": docs_path, "ids": ids, "split": str(tmp / "split.json")}


def test_sft_set_keeps_judged_passes_of_training_sources_only(world):
    tmp, ids = world["tmp"], world["ids"]
    out = tmp / "sft"
    m = build_dataset(DatasetConfig(gen_dirs=[str(tmp / "base"), str(tmp / "relaxed")], out=str(out),
                                    split_file=world["split"]))
    # oracle: 11 docs x 2 pairs per run; doc0, doc1 (held out) and the copy of doc0 (same text) give nothing
    excluded = {ids[0], ids[1], "copy-of-doc0"}
    runs = [[json.loads(x) for x in _rows_path(tmp / v).read_text().splitlines()] for v in ("base", "relaxed")]
    scores = [r["judge_score"] for rows in runs for r in rows]
    passed = [[r for r in rows if r["source_id"] not in excluded and (r["judge_score"] or 0) >= 3] for rows in runs]
    units_ok = sum(sum(1 for i in ids[2:10] if sum(r["source_id"] == i for r in p) == G) for p in passed)
    assert len(passed[0]) == 8 * G - 2  # Base scores 5 but for the two edited rows
    assert m["counts"] == {
        "rows": 44, "units_with_pairs": 22, "rows_passed": sum(s is not None and s >= 3 for s in scores),
        "rows_below_min_score": sum(s is not None and s < 3 for s in scores), "rows_unjudged": 1,
        "heldout_generations": 2 * 2 * (G + 1), "units_excluded": 2 * 3,
        "pairs_units_below_min_passed": 2 * 8 - units_ok, "pairs": units_ok,
        "reformulate": len(passed[0]) + len(passed[1]),
    }
    examples = load_examples(out)
    assert len(examples) == m["examples"] == units_ok + len(passed[0]) + len(passed[1])
    assert {e["source_id"] for e in examples}.isdisjoint({ids[0], ids[1], "copy-of-doc0"})
    rows = {(str(tmp / v), r["source_id"], r["gen_index"]): r for v, run in zip(("base", "relaxed"), runs) for r in run}
    state = {(str(tmp / v), e["key"]): e for v in ("base", "relaxed")
             for e in map(json.loads, (tmp / v / ".synth/state/shard-00000-of-00001.jsonl").read_text().splitlines())}
    for e in examples:
        assert e["messages"][-1]["role"] == "user" and "Source text:" in e["messages"][-1]["content"]
        if e["stage"] == "reformulate":
            row = rows[(e["gen_dir"], e["source_id"], e["gen_index"])]
            assert e["completion"] == row["text"] and e["judge_score"] >= 3
            assert row["genre"] in e["messages"][-1]["content"] and row["audience"] in e["messages"][-1]["content"]
        else:  # the teacher's pairs, as the JSON the stage-1 prompt asks for
            assert maga.parse_pairs(e["completion"], G) == [tuple(p) for p in state[(e["gen_dir"], e["unit"])]["pairs"]]
    # a looser stage-1 rule keeps docs 2 and 3 (1 of their 2 pairs passed); a stricter score keeps the same
    m = build_dataset(DatasetConfig(gen_dirs=[str(tmp / "base")], out=str(tmp / "sft_half"), split_file=world["split"],
                                    pairs_min_passed=0.5, min_score=5))
    assert (m["counts"]["pairs"], m["counts"]["reformulate"]) == (8, 14)
    # without the split file the held-out documents come back: 11 docs x 2 - 2 = 20 reformulations
    m = build_dataset(DatasetConfig(gen_dirs=[str(tmp / "base")], out=str(tmp / "sft_all"), stages=["reformulate"]))
    assert m["counts"]["reformulate"] == 20 and "pairs" not in m["counts"]


def test_dataset_bad_input_is_one_line(world, capsys):
    tmp = world["tmp"]
    assert toolmodel_main(["dataset", "--gen", str(tmp), "--out", str(tmp / "x")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp}: no .synth/run.json")
    (tmp / "all_heldout.json").write_text(json.dumps({"heldout": world["ids"]}))
    assert toolmodel_main(["dataset", "--gen", str(tmp / "base"), "--out", str(tmp / "x"),
                           "--split-file", str(tmp / "all_heldout.json")]) == 1
    assert "no SFT example passed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--min-score must be in"):
        DatasetConfig(gen_dirs=["g"], out="o", min_score=0)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "base")


def test_loss_is_on_the_completion_only(base_model):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(base_model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rewrite: the mill."}]
    ids, labels, n_prompt = encode_example(tok, messages, "Once upon a time, the mill.")
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]  # what the backends send
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(labels[n_prompt:]) == "Once upon a time, the mill.</s>"  # the model learns to stop
    batch = collate([{"input_ids": ids, "labels": labels}, {"input_ids": ids[:3], "labels": labels[:3]}], tok.pad_token_id)
    assert batch["labels"][1, 3:].eq(IGNORE_INDEX).all() and batch["attention_mask"][1].tolist() == [1] * 3 + [0] * (len(ids) - 3)


def test_tool_model_loop(world, base_model, tmp_path):
    """SFT -> int8 model -> the runner generates stage 2 from the teacher's pairs -> Table 1."""
    tmp = world["tmp"]
    data = tmp / "sft_loop"
    build_dataset(DatasetConfig(gen_dirs=[str(tmp / "base")], out=str(data), split_file=world["split"]))
    tool = tmp_path / "tool"
    record = train_tool_model(SFTConfig(model=str(base_model), data=str(data), out=str(tool), max_steps=3,
                                        lr=1e-3, progress=False))
    assert record["optimizer_steps"] == 3 and record["examples"] == {"pairs_kept": 6, "reformulate_kept": 14}
    assert json.loads((tool / "toolmodel.json").read_text())["config"]["model"] == str(base_model)

    from megadoc_pl.synth.backends.hf import TransformersBackend

    backend = TransformersBackend(str(tool), device="cpu", quantize="int8")
    assert tq.count_quantized_linears(backend.model) == (15, 15)  # 2 layers x 7 projections + lm_head
    assert backend.model_name.endswith("+int8")
    base = TransformersBackend(str(base_model), device="cpu")
    assert tq.count_quantized_linears(base.model) == (0, 15)
    tuned = dict(backend.model.named_parameters())["model.embed_tokens.weight"]
    assert not torch.equal(tuned, dict(base.model.named_parameters())["model.embed_tokens.weight"])

    student = tmp_path / "student"
    assert seed_pairs(str(tmp / "base"), str(student)) == 11
    rc = synthesize_main([
        "--task", "maga", "--judge", "--generations", str(G), "--input", str(world["docs"]), "--out", str(student),
        "--backend", "transformers", "--model", str(tool), "--backend-arg", "quantize=int8", "--device", "cpu",
        "--judge-backend", "template", "--split-file", world["split"], "--max-new-tokens", "8",
        "--temperature", "0", "--min-keyword-coverage", "0", "--no-progress"])
    assert rc == 0
    stats = json.loads((student / ".synth/stats/shard-00000-of-00001.json").read_text())
    assert "maga_pairs" not in stats["runs"][-1]["by_stage"]  # stage 1 came from the teacher
    rows = [json.loads(x) for x in _rows_path(student).read_text().splitlines()]
    assert rows and all(r["model"] == f"{tool}+int8" and r["judge_model"] == f"template-v{TEMPLATE_VERSION}" for r in rows)
    report = compare(str(tmp / "base"), str(student))
    teacher_rows = [json.loads(x) for x in _rows_path(tmp / "base").read_text().splitlines()]
    common = ({(r["source_id"], r["gen_index"]) for r in rows if r["judge_score"] is not None}
              & {(r["source_id"], r["gen_index"]) for r in teacher_rows if r["judge_score"] is not None})
    assert report["teacher"]["total"] == report["student"]["total"] == len(common) > 0
    assert sum(report["student"]["scores"].values()) == len(common)
    assert report["diff"] == pytest.approx(report["student"]["rate_pass"] - report["teacher"]["rate_pass"])
    table = format_table(report)
    assert table.splitlines()[0] == "| Model | Total | score 5 | 4 | 3 | 2 | 1 | Rate(>=3) | Diff |"
    assert "| teacher (base) |" in table and "| student (student) |" in table


def test_quantize_errors_and_install_hint(monkeypatch, base_model):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base_model)
    with pytest.raises(ValueError, match="quantize='int4'"):
        tq.quantize_linears(model, "int4")
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(MissingDependency, match=r"pip install 'megadoc_pl\[toolmodel\]'"):
        tq.quantize_linears(model, "int8")


# ----------------------------------------------------------------------------- vLLM W8A8 export

# llm-compressor 0.14's documented API (oneshot's signature, the modifiers' pydantic fields).
DOC_ONESHOT = {"model", "config_name", "tokenizer", "processor", "precision", "recipe", "dataset", "splits",
               "batch_size", "num_calibration_samples", "shuffle_calibration_samples", "max_seq_length",
               "text_column", "pipeline", "output_dir", "log_dir", "save_compressed"}
DOC_FIELDS = {"SmoothQuantModifier": {"smoothing_strength", "mappings", "ignore", "num_calibration_steps"},
              "QuantizationModifier": {"targets", "ignore", "scheme", "config_groups", "kv_cache_scheme"}}
DOC_SCHEMES = {"W8A8", "INT8", "FP8_DYNAMIC", "W4A16", "FP8"}


def _fake_llmcompressor():
    calls = []

    def modifier(name):
        def make(**kw):
            assert set(kw) <= DOC_FIELDS[name], f"undocumented {name} fields {set(kw) - DOC_FIELDS[name]}"
            return (name, kw)
        return make

    def oneshot(**kw):
        assert set(kw) <= DOC_ONESHOT, f"undocumented oneshot args {set(kw) - DOC_ONESHOT}"
        calls.append(kw)
        kw["model"].save_pretrained(kw["output_dir"])  # what output_dir does (uncompressed here)
        return kw["model"]

    return (oneshot, {n: modifier(n) for n in DOC_FIELDS}), calls


def test_w8a8_export_calls_match_documented_api(world, base_model, tmp_path):
    api, calls = _fake_llmcompressor()
    out = tmp_path / "w8a8"
    data = world["tmp"] / "sft_w8a8"
    build_dataset(DatasetConfig(gen_dirs=[str(world["tmp"] / "base")], out=str(data)))
    record = tq.export_w8a8(str(base_model), str(out), calibration=str(data), num_samples=4, max_seq_len=64, api=api)
    (call,) = calls
    assert call["recipe"] == [("SmoothQuantModifier", {"smoothing_strength": 0.8}),
                              ("QuantizationModifier", {"targets": ["Linear"], "scheme": "W8A8", "ignore": ["lm_head"]})]
    assert call["num_calibration_samples"] == 4 and call["max_seq_length"] == 64
    assert len(call["dataset"]) == 4 and all(len(r["input_ids"]) == 64 for r in call["dataset"])
    assert record["quantization"]["recipe"][1][1]["scheme"] == "W8A8"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() and (out / "toolmodel.json").is_file()
    assert tq.w8a8_recipe("fp8") == [("QuantizationModifier", {"targets": ["Linear"], "scheme": "FP8_DYNAMIC",
                                                                "ignore": ["lm_head"]})]
    assert {s for s in tq.W8A8_SCHEMES.values()} <= DOC_SCHEMES
    with pytest.raises(ValueError, match="needs --calibration"):
        tq.export_w8a8(str(base_model), str(out), api=api)


def test_w8a8_against_installed_llmcompressor():
    llmcompressor = pytest.importorskip("llmcompressor")
    oneshot, classes = tq._llmcompressor_api()
    params = set(inspect.signature(llmcompressor.oneshot).parameters)
    assert {"model", "tokenizer", "output_dir", "recipe", "dataset", "num_calibration_samples", "max_seq_length"} <= params
    for name, kw in tq.w8a8_recipe("int8"):
        classes[name](**kw)
    from compressed_tensors.quantization import preset_name_to_scheme

    for scheme in tq.W8A8_SCHEMES.values():
        preset_name_to_scheme(scheme, ["Linear"])
