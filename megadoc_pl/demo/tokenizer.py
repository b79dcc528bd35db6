"""The demo tokenizer: a small byte-level BPE trained on the demo world, built once and cached.

The directory it writes is both a ``tokenizers`` file (``tokenizer.json``) and a ``transformers``
tokenizer (``tokenizer_config.json`` naming BOS/EOS/pad), so exported models can ship it.
Specials come first: ``<s>`` = 0 (BOS), ``</s>`` = 1 (EOS), ``<pad>`` = 2. No post-processor
adds them: the token store decides about BOS/EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from megadoc_pl.data.tokenizer import train_byte_level_bpe
from megadoc_pl.utils import atomic_dir

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
BOS, EOS, PAD = SPECIAL_TOKENS


def _texts(jsonl_path: Path) -> Iterator[str]:
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train_tokenizer(texts: Iterable[str], vocab_size: int):  # -> tokenizers.Tokenizer
    """Train a byte-level BPE. Deterministic for the same texts in the same order."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"demo.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}")
    return train_byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS)


def save_tokenizer_dir(tok, out_dir: Path) -> None:  # tok: tokenizers.Tokenizer
    """Write tokenizer.json plus the transformers files (tokenizer_config.json with bos/eos/pad)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    tok.save(str(out_dir / "tokenizer.json"))  # the tokenizers-native file, byte-identical per training


def build_demo_tokenizer(docs_jsonl: str | Path, out_dir: str | Path, vocab_size: int) -> Path:
    """Train on the world's documents and write the tokenizer directory atomically; returns it."""
    out_dir = Path(out_dir)
    tok = train_tokenizer(_texts(Path(docs_jsonl)), vocab_size)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        save_tokenizer_dir(tok, tmp)
    return out_dir
