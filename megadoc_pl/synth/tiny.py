"""A tiny random-weight chat model built locally, for tests and CPU benchmarks of the backends.

A byte-level BPE tokenizer is trained on a few sentences with ``tokenizers``, wrapped as a
transformers fast tokenizer with a small Jinja chat template, and saved beside a randomly
initialised ``LlamaForCausalLM`` of a few thousand parameters. Its outputs are noise; what it
exercises is the real code path (chat template, left-padded batched generate, n samples, EOS).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "Rewrite the document as an article. Document: Article:",
    "Alice founded the town of Brindle in 1821 and built its first mill near the river.",
    "Questions and answers about the mill, the river and the town.",
    "The genre is a story; the audience is a group of curious children.",
    "Give a score between 1 and 5 as JSON with an analysis.",
] * 10


def build_tiny_chat_model(
    out_dir: str | Path,
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a tiny chat model (config, weights, tokenizer with chat template) to ``out_dir``.

    For vLLM use a head size its kernels support (hidden_size / num_heads = 64, e.g. 256 / 4).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from megadoc_pl.data.tokenizer import train_byte_level_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level_bpe(_CORPUS, vocab_size)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    return out
