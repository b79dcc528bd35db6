"""Evaluate checkpoints (one, or K as an ensemble) or an HF model on the named validation sets
and on local multiple-choice tasks; prints JSON and writes it to --out.

    python tools/evaluate.py --checkpoint runs/NAME/checkpoints/last.ckpt --out eval.json
    python tools/evaluate.py --checkpoint s0.ckpt s1.ckpt s2.ckpt --ensemble logit --config runs/s0/config.yaml
    python tools/evaluate.py --hf hf/NAME --recipe megadoc_stitch scale=paper_300m --tasks arc_easy=arc_e.jsonl
    python tools/evaluate.py --hf hf/NAME --no-val --tasks piqa=piqa.jsonl sciq=sciq.jsonl

The validation sets are rebuilt from the recipe (the checkpoint's own by default, or --config /
--recipe) exactly as training built them, and refused if they share documents with the run's
training sources. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", metavar="CKPT",
                     help="Lightning checkpoint(s) or run directories (their last.ckpt); K > 1 is an ensemble")
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face Llama directory (e.g. from tools/export_hf.py)")
    ap.add_argument("--ensemble", choices=["logit", "prob"], default="logit",
                    help="how K checkpoints are combined: average logits (default) or probabilities")
    rec = ap.add_mutually_exclusive_group()
    rec.add_argument("--recipe", nargs="+", metavar="NAME_OR_KEY=VALUE",
                     help="recipe name followed by key=value overrides (default: the checkpoint's recipe)")
    rec.add_argument("--config", metavar="YAML", help="a run's config.yaml (resolved recipe)")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides applied to --config or the checkpoint's recipe (e.g. data.val.max_windows=50)")
    ap.add_argument("--tasks", nargs="*", default=[], metavar="NAME=PATH", help="multiple-choice JSONL files")
    ap.add_argument("--sets", nargs="*", default=None, metavar="NAME", help="only these validation sets")
    ap.add_argument("--no-val", action="store_true", help="skip the validation sets (tasks only)")
    ap.add_argument("--tokenizer", help="tokenizer for the tasks (default: the recipe's, else the one the run "
                    "kept or the --hf directory's)")
    bos = ap.add_mutually_exclusive_group()
    bos.add_argument("--bos", dest="add_bos", action="store_true", default=None, help="prefix BOS to task sequences")
    bos.add_argument("--no-bos", dest="add_bos", action="store_false", help="do not prefix BOS")
    ap.add_argument("--batch-size", type=int, default=8, help="windows / sequences per forward pass")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N questions of each task")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto",
                    help="auto: bf16 autocast on GPU, fp32 on CPU")
    ap.add_argument("--out", help="write the JSON result here")
    ap.add_argument("--curves-dir", help="write loss_by_position_<set>.csv here")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    from megadoc_pl.eval.multiple_choice import parse_task_specs
    from megadoc_pl.eval.runner import EvalSpec, run_evaluation
    from megadoc_pl.utils import atomic_write_json

    try:
        spec = EvalSpec(
            checkpoints=args.checkpoint or [], hf=args.hf, ensemble=args.ensemble,
            recipe=args.recipe[0] if args.recipe else None, config=args.config,
            overrides=(args.recipe[1:] if args.recipe else []) + list(args.overrides),
            tasks=parse_task_specs(args.tasks), sets=args.sets, validation=not args.no_val,
            tokenizer=args.tokenizer, add_bos=args.add_bos, batch_size=args.batch_size, task_limit=args.limit,
            device=args.device, precision=args.precision, out_dir=args.curves_dir, progress=not args.quiet,
        )
        result = run_evaluation(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    print(text)
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
