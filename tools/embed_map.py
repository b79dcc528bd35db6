#!/usr/bin/env python
"""t-SNE map of real vs synthetic documents (MAGA Fig. 5 / v2 Fig. 2) and a distribution-shift number.

  python tools/embed_map.py --model runs/real/checkpoints/last.ckpt --real docs.jsonl \\
      --synthetic rephrase=gens/rephrase/ --synthetic maga=gens/maga/ --sample 2000 --out embed/

Documents are embedded by the model (a megadoc_pl Lightning checkpoint or a local HF model dir):
mean-pooled final hidden states over non-pad tokens, L2-normalised. Writes embed_map.png (one
panel per synthetic set over the real documents), embed_map.csv (set, id, x, y) and shift.json
(per set: shift = mean nearest-real distance / real-to-real nearest distance; ~1 = same
distribution, 0 = copies). See megadoc_pl/analysis/embed_map.py.
"""

from __future__ import annotations

import argparse
import sys

from megadoc_pl.analysis import embed_map as em


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="Lightning checkpoint (.ckpt file or sharded dir), run directory or local HF model dir")
    ap.add_argument("--tokenizer", help="tokenizer (default: the one the run kept, else the recipe's data.tokenizer; "
                    "an HF dir's own)")
    ap.add_argument("--real", required=True, nargs="+", help="real documents: JSONL/Parquet files, dirs, or one token store")
    ap.add_argument("--synthetic", required=True, action="append", metavar="NAME=PATH",
                    help="a labelled generation file, dir or token store (repeat for more sets; a repeated NAME adds paths)")
    ap.add_argument("--sample", type=int, default=1000, help="documents per set, by seed (default 1000; 0 = all)")
    ap.add_argument("--max-tokens", type=int, default=512, help="truncate documents, specials included (default 512)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="sampling and t-SNE seed")
    ap.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (capped at (n-1)/3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--text-field", default="text", help="text field of the real documents")
    ap.add_argument("--id-field", default="id", help="id field of the real documents")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", required=True, help="output directory")
    a = ap.parse_args(argv)
    try:
        report = em.embed_map(a.model, a.real, em.group_specs(a.synthetic), a.out, tokenizer=a.tokenizer,
                              sample=a.sample or None, max_tokens=a.max_tokens, batch_size=a.batch_size,
                              seed=a.seed, perplexity=a.perplexity, device=a.device, text_field=a.text_field,
                              id_field=a.id_field, progress=not a.no_progress)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    for line in em.summary_lines(report):
        print(line)
    for p in report["files"]:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
