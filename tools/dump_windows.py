#!/usr/bin/env python
"""Decode windows of a recipe back to text with the sources of every piece, one JSON row each.

    python tools/dump_windows.py --recipe megadoc_stitch --split train --start 0 --count 4 --out w.jsonl
    python tools/dump_windows.py --recipe megadoc_stitch scale=paper_300m data.real=... --split val/iid ...

Row: {"index", "stream", "stream_window", "tokens", "text", "sources": [{source_id, task,
gen_index, doc_start, doc_end, window_start, window_end, store}, ...]}. Windows are a pure
function of (recipe, seed, index), so the rows are exactly what training reads at those indices.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="method recipe name or YAML path")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (as for recipes/train.py)")
    ap.add_argument("--split", default="train", help="train, or val/NAME for a validation set (default: train)")
    ap.add_argument("--start", type=int, default=0, help="first window index")
    ap.add_argument("--count", type=int, default=8, help="number of windows")
    ap.add_argument("--out", required=True, help="output JSONL file ('-' for stdout)")
    args = ap.parse_args(argv)
    from megadoc_pl.data.prepare import prepare_corpus
    from megadoc_pl.data.windows import window_rows
    from megadoc_pl.demo import corpus_inputs
    from megadoc_pl.recipes import compose_recipe
    from megadoc_pl.utils import atomic_write_text

    try:
        cfg = compose_recipe(args.recipe, args.overrides)
        prepared = prepare_corpus(cfg, corpus_inputs(cfg))
        windows = prepared.windows(args.split)
        total = len(windows)
        if not 0 <= args.start < total:
            raise ValueError(f"--start {args.start} is past the last window of {args.split} ({total} windows"
                             + (", the plan's train.max_steps x global batch" if args.split == "train" else "") + ")")
        rows = window_rows(windows, args.start, args.count, prepared.tokenizer.decode)
    except (ValueError, IndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(rows) < args.count:
        print(f"note: --count {args.count} from --start {args.start} goes past the {total} windows of {args.split}: "
              f"wrote {len(rows)}", file=sys.stderr)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        atomic_write_text(args.out, text)
        print(f"wrote {len(rows)} windows to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
