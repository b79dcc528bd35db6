"""How far apart the training losses of two strategies are, from the same initial weights.

Trains the tiny test recipe (2 layers, d=32, 20 steps, one CPU thread) with the default strategy
and with ``train.strategy=fsdp2`` (one process), in one precision, and prints both curves and
their largest difference. FSDP2 initialises row by row (``Llama.init_rowwise``); the default
strategy's model is given the same weights here, so only the strategies' numerics differ.

    python benchmarks/bench_strategy_numerics.py [--precision bf16-mixed|32-true] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' tiny tokenizer, corpus and recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()

    import torch
    import torch.distributed as dist

    from helpers import build_tiny_tokenizer
    from megadoc_pl.train import module as module_mod
    from megadoc_pl.train.run import train
    from helpers import QUIET, scalars, tiny_recipe, write_corpus

    torch.set_num_threads(1)
    plain_init = module_mod.MegadocLM.__init__

    def same_weights(self, cfg):
        plain_init(self, cfg)
        if self.cfg.train.strategy != "fsdp2":
            self.model.init_rowwise(int(self.cfg.train.seed))

    module_mod.MegadocLM.__init__ = same_weights
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok, corpus = build_tiny_tokenizer(root / "tok"), write_corpus(root / "corpus.jsonl")
        curves = {}
        for i, strategy in enumerate(("auto", "fsdp2")):
            os.environ["MASTER_PORT"] = str(24000 + os.getpid() % 5000 + i)
            cfg = tiny_recipe(corpus, tok, root, strategy, steps=args.steps,
                              extra=[f"train.strategy={strategy}", f"train.precision={args.precision}"])
            curves[strategy] = scalars(train(cfg, QUIET), "train/loss")
            if dist.is_initialized():
                dist.destroy_process_group()
    a, b = curves["auto"], curves["fsdp2"]
    for name, c in curves.items():
        print(f"{name:6s}", " ".join(f"{c[s]:.4f}" for s in sorted(c)))
    worst = max(abs(a[s] - b[s]) for s in a)
    last = max(a)
    print(f"SUMMARY: {args.precision}: max |auto - fsdp2| {worst:.2g} nats over {len(a)} steps; "
          f"final {a[last]:.4f} vs {b[last]:.4f}")


if __name__ == "__main__":
    main()
