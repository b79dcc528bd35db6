"""Export a megadoc_pl Lightning checkpoint as a Hugging Face LlamaForCausalLM directory.

    python tools/export_hf.py --checkpoint runs/NAME/checkpoints/last.ckpt --out hf/NAME
    python tools/export_hf.py --checkpoint runs/NAME --out hf/NAME     # the run's last checkpoint

The tokenizer is the one the run trained with (the copy in runs/NAME/tokenizer/). See docs/model.md.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True,
                    help="Lightning .ckpt written by the trainer, a sharded checkpoint or a run directory")
    ap.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, tokenizer)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json or directory (default: the run's, else the recipe's data.tokenizer)")
    ap.add_argument("--no-tokenizer", action="store_true", help="export weights and config only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the saved weights")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = ap.parse_args(argv)

    from megadoc_pl.checkpoints import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.out, tokenizer="none" if args.no_tokenizer else args.tokenizer,
                                dtype=args.dtype, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
