#!/usr/bin/env python
"""Train a recipe: a method (recipes/methods) at a scale (recipes/scales) with key=value overrides.

    python recipes/train.py --recipe megadoc_stitch                      # the CPU demo
    python recipes/train.py --recipe megadoc_stitch scale=paper_300m data.real=real/ \\
        data.synthetic=gen/rephrase data.tokenizer=tok/tokenizer.json
    python recipes/train.py --recipe rephrase data.generations=8 --dry-run   # the plan, as JSON
    python recipes/train.py --recipe megadoc_stitch scale=paper_300m --dry-run \
        --assume-tokens real=203867748,synthetic=3.7B                   # the plan without any data
    python recipes/train.py --list                                       # recipes and scales
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="method recipe name (see --list) or a recipe YAML path")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides, e.g. scale=paper_300m data.seq_len=1024 train.lr=3e-3")
    ap.add_argument("--dry-run", action="store_true", help="prepare the data and print the plan as JSON; no training")
    ap.add_argument("--assume-tokens", type=_stream_sizes, metavar="real=N[,synthetic=M]",
                    help="with --dry-run: plan from these stream sizes (unique tokens per pass; 200M, 3.7B...) "
                         "without preparing any data; vocabulary from model.vocab_size or model.size")
    ap.add_argument("--list", action="store_true", help="list method recipes and scale presets")
    args = ap.parse_args(argv)
    if not args.list and not args.recipe:
        ap.error("--recipe NAME is required (see --list)")
    if args.assume_tokens is not None and not args.dry_run:
        ap.error("--assume-tokens only plans: add --dry-run")
    return args


def _stream_sizes(text: str) -> dict[str, int]:
    from megadoc_pl.dryrun import parse_stream_sizes

    try:
        return parse_stream_sizes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.list and not args.dry_run:
        # training: the same code path as ``megadoc-pl fit`` (one parser, one precedence, one exit code table)
        from megadoc_pl.train.cli import main as cli_main

        return cli_main(["fit", "--recipe", args.recipe] + [a for o in args.overrides for a in ("--set", o)])
    from megadoc_pl import recipes

    try:
        if args.list:
            print(recipes.describe_all())
            return 0
        cfg = recipes.compose_recipe(args.recipe, args.overrides)
        from megadoc_pl import dryrun

        if args.assume_tokens is not None:
            report = dryrun.assumed_dry_run_report(cfg, args.assume_tokens)
        else:
            from megadoc_pl.data.prepare import prepare_corpus
            from megadoc_pl.demo import corpus_inputs

            report = dryrun.dry_run_report(prepare_corpus(cfg, corpus_inputs(cfg)))
        print(json.dumps(report, indent=2, default=str))
        return 0
    except ValueError as e:  # bad recipe, bad data, impossible mixture: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
