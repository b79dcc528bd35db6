"""Command line of ``tools/toolmodel.py``: dataset, train, seed-pairs, report, export-w8a8."""

from __future__ import annotations

import argparse
import json
import sys

from megadoc_pl.synth.toolmodel.dataset import STAGES


def _stages(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="toolmodel.py", description="MAGA tool models: distil the judged "
                                "generations of a big model into a small one, quantize it, compare it (Table 1).")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dataset", help="judged maga runs -> OUT/sft.jsonl (judge filter, held-out hygiene)")
    d.add_argument("--gen", nargs="+", required=True, help="maga output directories (--task maga --judge)")
    d.add_argument("--out", required=True)
    d.add_argument("--min-score", type=int, default=3, help="keep reformulations with judge_score >= this")
    d.add_argument("--stages", type=_stages, default=list(STAGES), help="pairs,reformulate (default both)")
    d.add_argument("--pairs-min-passed", type=float, default=1.0,
                   help="pairs: share of a unit's pairs whose reformulation passed (default all)")
    d.add_argument("--split-file", default=None, help="split.json: held-out documents give no example")
    d.add_argument("--input", nargs="+", default=None, help="source documents (default: each run's inputs)")
    d.add_argument("--text-field", default="text")
    d.add_argument("--id-field", default="id")
    d.add_argument("--tokenizer", default=None, help="the generation run's --tokenizer (prompt budget)")

    t = sub.add_parser("train", help="fine-tune a causal LM on sft.jsonl, loss on the completion only")
    t.add_argument("--model", required=True, help="base model (HF directory or hub name, with a chat template)")
    t.add_argument("--data", required=True, help="sft.jsonl or its directory")
    t.add_argument("--out", required=True)
    t.add_argument("--stages", type=_stages, default=list(STAGES))
    t.add_argument("--max-prompt-tokens", type=int, default=4096)
    t.add_argument("--max-completion-tokens", type=int, default=4096)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--max-steps", type=int, default=-1)
    t.add_argument("--lr", type=float, default=1e-5)
    t.add_argument("--warmup-ratio", type=float, default=0.03)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--accumulate-grad-batches", type=int, default=1)
    t.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on GPU, else 32-true)")
    t.add_argument("--devices", default="auto")
    t.add_argument("--strategy", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("seed-pairs", help="copy a teacher run's stage-1 pairs into a new student --out")
    s.add_argument("--teacher", required=True)
    s.add_argument("--out", required=True)

    r = sub.add_parser("report", help="judge histogram of the student next to the teacher's (MAGA Table 1)")
    r.add_argument("--teacher", required=True)
    r.add_argument("--student", required=True)
    r.add_argument("--min-score", type=int, default=3)
    r.add_argument("--unpaired", action="store_true", help="count every judged row, not only common keys")
    r.add_argument("--json", default=None, help="also write the report here")

    q = sub.add_parser("export-w8a8", help="SmoothQuant + W8A8 checkpoint for vLLM (GPU, llm-compressor)")
    q.add_argument("--model", required=True, help="the tool model directory")
    q.add_argument("--out", required=True)
    q.add_argument("--scheme", choices=("int8", "fp8"), default="int8")
    q.add_argument("--calibration", default=None, help="sft.jsonl: calibration text (needed for int8)")
    q.add_argument("--num-samples", type=int, default=512)
    q.add_argument("--max-seq-len", type=int, default=4096)
    q.add_argument("--smoothing-strength", type=float, default=0.8)
    return p


def run(a: argparse.Namespace) -> dict | str:
    if a.command == "dataset":
        from megadoc_pl.synth.toolmodel.dataset import DatasetConfig, build_dataset

        return build_dataset(DatasetConfig(
            gen_dirs=a.gen, out=a.out, min_score=a.min_score, stages=a.stages, pairs_min_passed=a.pairs_min_passed,
            split_file=a.split_file, inputs=a.input, text_field=a.text_field, id_field=a.id_field,
            tokenizer=a.tokenizer))
    if a.command == "train":
        from megadoc_pl.synth.toolmodel.sft import SFTConfig, train_tool_model

        devices = int(a.devices) if str(a.devices).isdigit() else a.devices
        return train_tool_model(SFTConfig(
            model=a.model, data=a.data, out=a.out, stages=a.stages, max_prompt_tokens=a.max_prompt_tokens,
            max_completion_tokens=a.max_completion_tokens, epochs=a.epochs, max_steps=a.max_steps, lr=a.lr,
            warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay, batch_size=a.batch_size,
            accumulate_grad_batches=a.accumulate_grad_batches, precision=a.precision, devices=devices,
            strategy=a.strategy, seed=a.seed, progress=not a.no_progress))
    if a.command == "seed-pairs":
        from megadoc_pl.synth.toolmodel.report import seed_pairs

        return {"units_seeded": seed_pairs(a.teacher, a.out)}
    if a.command == "report":
        from megadoc_pl.synth.toolmodel.report import compare, format_table

        report = compare(a.teacher, a.student, a.min_score, paired=not a.unpaired)
        if a.json:
            from megadoc_pl.utils import atomic_write_json

            atomic_write_json(a.json, report)
        return format_table(report)
    from megadoc_pl.synth.toolmodel.quantize import export_w8a8

    return export_w8a8(a.model, a.out, a.calibration, a.scheme, a.num_samples, a.max_seq_len, a.smoothing_strength)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = run(a)
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    print(result if isinstance(result, str) else json.dumps(result, indent=2, default=str))
    return 0
