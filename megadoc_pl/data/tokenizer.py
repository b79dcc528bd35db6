"""Load a tokenizer (tokenizer.json or a tokenizer directory) with its BOS/EOS ids and fingerprint.

The token store adds BOS/EOS itself, so text is always encoded *without* the tokenizer's own
special-token template: what is stored is exactly ``[bos] + encode(text) + [eos]``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from tokenizers import Tokenizer

# Special-token spellings, most common first. The first one present in the vocabulary wins.
# Document markers only: chat-turn tokens (<|im_start|>, <|eot_id|>, ...) are not guessed.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]")
EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")


@dataclass
class TokenizerInfo:
    """A loaded tokenizer: the ``tokenizers.Tokenizer`` plus what the token store needs to know."""

    tokenizer: Tokenizer
    vocab_size: int  # ids are < vocab_size (includes added tokens)
    bos_id: Optional[int]
    eos_id: Optional[int]
    fingerprint: str  # sha256 of the canonical tokenizer JSON
    path: str  # where it was loaded from
    json_str: str = field(repr=False, default="")  # the serialised tokenizer (sent to worker processes)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        return [enc.ids for enc in _encode_fast(self.tokenizer, texts)]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def require_special(self, add_bos: bool, add_eos: bool) -> None:
        """One-line error when BOS/EOS is requested but the tokenizer has none."""
        for wanted, tok_id, name, cands, flag in (
            (add_bos, self.bos_id, "BOS", BOS_CANDIDATES, "--no-bos / data.add_bos=false"),
            (add_eos, self.eos_id, "EOS", EOS_CANDIDATES, "--no-eos / data.add_eos=false"),
        ):
            if wanted and tok_id is None:
                raise ValueError(
                    f"{self.path}: tokenizer has no {name} token (looked for {', '.join(cands)} and "
                    f"tokenizer_config.json) (fix: add one to the tokenizer, or pass {flag})"
                )


def _encode_fast(tok: Tokenizer, texts: list[str]):
    # encode_batch_fast skips the character offsets (tokenizers >= 0.21): same ids, less work.
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None:
        return fast(texts, add_special_tokens=False)
    return tok.encode_batch(texts, add_special_tokens=False)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int,
                         special_tokens: Sequence[str] = ("<s>", "</s>", "<pad>")) -> Tokenizer:
    """Train a byte-level BPE whose specials take the first ids (<s>=0, </s>=1, <pad>=2 by default).

    Deterministic for the same texts in the same order; no post-processor adds BOS/EOS (the
    token store decides). Used by the demo tokenizer, the tiny chat model and the test fixtures.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def fingerprint_json(json_str: str) -> str:
    """sha256 of the tokenizer JSON, canonicalised (key order and whitespace do not matter)."""
    canon = json.dumps(json.loads(json_str), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _config_special(cfg_dir: Path, key: str) -> Optional[str]:
    """BOS/EOS spelling from tokenizer_config.json / special_tokens_map.json, if present."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = cfg_dir / name
        if not f.is_file():
            continue
        try:
            val = json.loads(f.read_text(encoding="utf-8")).get(key)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(val, dict):  # {"content": "<s>", ...}
            val = val.get("content")
        if isinstance(val, str) and val:
            return val
    return None


# End-of-turn tokens of chat models: instruct tokenizer configs name them as eos_token, but a
# pre-training document ends with the end-of-text token when the vocabulary has one.
CHAT_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


def _detect(tok: Tokenizer, configured: Optional[str], candidates: tuple[str, ...]) -> Optional[int]:
    if configured in CHAT_TURN_TOKENS:
        candidates = candidates + (configured,)
        configured = None
    for spelling in ((configured,) if configured else ()) + candidates:
        tid = tok.token_to_id(spelling)
        if tid is not None:
            return tid
    return None


def load_tokenizer(path: Union[str, os.PathLike]) -> TokenizerInfo:
    """Load ``tokenizer.json`` or a directory holding one (else a transformers fast tokenizer dir).

    BOS/EOS come from tokenizer_config.json (``bos_token`` / ``eos_token``) when it names a
    token in the vocabulary, else from the usual spellings (<s>, </s>, <|begin_of_text|>,
    <|end_of_text|>, <|endoftext|>, ...). A chat end-of-turn EOS in the config (<|eot_id|>,
    <|im_end|>) yields to an end-of-text token of the vocabulary.
    """
    p = Path(path)
    if p.is_dir():
        cfg_dir = p
        if (p / "tokenizer.json").is_file():
            json_str = (p / "tokenizer.json").read_text(encoding="utf-8")
        else:
            json_str = _from_transformers(p)
    elif p.is_file():
        cfg_dir = p.parent
        json_str = p.read_text(encoding="utf-8")
    else:
        raise ValueError(f"{p}: no such tokenizer file or directory (fix: pass a tokenizer.json or a tokenizer directory)")
    try:
        tok = Tokenizer.from_str(json_str)
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{p}: not a valid tokenizers JSON ({str(e).splitlines()[0]}) (fix: pass a tokenizer.json saved by tokenizers/transformers)") from None
    # transformers saves tokenizer_config.json beside tokenizer.json: it names the specials.
    bos_cfg = _config_special(cfg_dir, "bos_token")
    eos_cfg = _config_special(cfg_dir, "eos_token")
    return TokenizerInfo(
        tokenizer=tok,
        # max id + 1, not the vocabulary's size: added tokens may leave gaps in the ids
        vocab_size=max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1,
        bos_id=_detect(tok, bos_cfg, BOS_CANDIDATES),
        eos_id=_detect(tok, eos_cfg, EOS_CANDIDATES),
        fingerprint=fingerprint_json(json_str),
        path=str(p),
        json_str=json_str,
    )


def _from_transformers(p: Path) -> str:
    """The tokenizers JSON of a transformers tokenizer directory without a tokenizer.json."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"{p}: no tokenizer.json and transformers cannot load it ({str(e).splitlines()[0] if str(e) else type(e).__name__}) "
            f"(fix: pass a directory with tokenizer.json or a tokenizer that transformers can load)"
        ) from None
    backend = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"{p}: transformers loaded a slow tokenizer without a tokenizers backend (fix: save a fast tokenizer, tokenizer.json)")
    return backend.to_str()
