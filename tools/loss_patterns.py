#!/usr/bin/env python
"""MAGA loss-pattern analysis: where along documents model B falls behind model A.

  # score documents with two models (checkpoints or HF export dirs), then analyse
  python tools/loss_patterns.py --model-a runs/real/hf --model-b runs/maga/hf \\
      --documents val.jsonl --tokenizer tokenizer.json --out patterns/
  # or analyse precomputed per-token losses (.jsonl / .npz / NaN-padded .npy)
  python tools/loss_patterns.py --losses-a a.jsonl --losses-b b.jsonl --out patterns/

diff = loss_B - loss_A per token; first anomaly = first window (5% of the document) whose mean
exceeds |mu| + k sigma of the per-token diffs (see megadoc_pl/analysis/loss_patterns.py).
Writes report.json, examples.html, histogram_k<k>.png, example_<i>.png (and, when scoring,
losses_a.jsonl / losses_b.jsonl for reuse).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadoc_pl.analysis import loss_patterns as lp


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-a", help="reference model (checkpoint, run dir or HF dir), e.g. trained on real data")
    ap.add_argument("--model-b", help="compared model, e.g. trained with synthetic data")
    ap.add_argument("--documents", help="JSONL/Parquet documents to score")
    ap.add_argument("--tokenizer", help="tokenizer.json or tokenizer directory")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--id-field", default="id")
    ap.add_argument("--max-tokens", type=int, default=2048, help="truncate documents (default 2048)")
    ap.add_argument("--max-documents", type=int, help="score at most this many documents")
    ap.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--losses-a", help="precomputed per-token losses of model A")
    ap.add_argument("--losses-b", help="precomputed per-token losses of model B")
    ap.add_argument("--k", type=float, nargs="+", default=list(lp.DEFAULT_KS), help="thresholds k (default 1 2 3)")
    ap.add_argument("--fraction", type=float, default=lp.DEFAULT_FRACTION, help="window / length (default 0.05)")
    ap.add_argument("--bins", type=int, default=10, help="histogram bins over 0-100%% (default 10)")
    ap.add_argument("--examples", type=int, default=20, help="documents shown in examples.html")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    try:
        out = Path(a.out)
        if a.losses_a or a.losses_b:
            if not (a.losses_a and a.losses_b):
                raise ValueError("give both --losses-a and --losses-b")
            ids, la, lb, tokens = lp.pair_losses(lp.read_losses(a.losses_a), lp.read_losses(a.losses_b))
        elif a.model_a and a.model_b and a.documents and a.tokenizer:
            ids, (la, lb), tokens = lp.score_documents(
                [a.model_a, a.model_b], a.documents, a.tokenizer, text_field=a.text_field,
                id_field=a.id_field, max_tokens=a.max_tokens, max_documents=a.max_documents,
                add_bos=not a.no_bos, device=a.device)
            lp.write_losses_jsonl(out / "losses_a.jsonl", ids, la, tokens)
            lp.write_losses_jsonl(out / "losses_b.jsonl", ids, lb, tokens)
        else:
            raise ValueError("give --losses-a/--losses-b, or --model-a, --model-b, --documents and --tokenizer")
        report = lp.analyze(la, lb, ids=ids, ks=a.k, fraction=a.fraction, bins=a.bins)
        diffs = [lp.loss_diff(x, y) for x, y in zip(la, lb)]
        paths = lp.write_outputs(out, report, diffs, tokens, max_examples=a.examples,
                                 label_a=a.label_a, label_b=a.label_b)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for line in lp.summary_lines(report):
        print(line)
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
