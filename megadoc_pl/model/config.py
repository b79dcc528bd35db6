"""The model's configuration, without torch: named sizes and the one recipe -> LlamaConfig mapping.

Importing this module costs nothing (no torch), so recipes are validated, and dry runs costed,
before anything heavy is imported or any data is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

@dataclass
class LlamaConfig:
    """Architecture of one model; ``from_name`` gives the named sizes."""

    d_model: int = 128  # residual stream width
    n_layers: int = 2  # transformer blocks
    n_heads: int = 4  # query heads (head_dim = d_model // n_heads)
    n_kv_heads: int = 4  # key/value heads (GQA when < n_heads)
    d_mlp: int = 384  # SwiGLU inner width
    vocab_size: int = 2048  # embedding rows and LM-head outputs
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of every weight matrix at init (embeddings included)
    scale_residual_init: bool = False  # also divide output projections' std by sqrt(2 * n_layers) (GPT-2 style); off = the papers' plain 0.02
    max_seq_len: int = 4096  # longest context trained on (recorded in exports; RoPE has no table)
    attention_backend: str = "auto"  # auto | flash_attn | torch_varlen | flex | sdpa (config.AttentionBackend)
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked cross-entropy
    loss_impl: str = "auto"  # auto | chunked | compiled | liger: how the LM-head loss runs (config.LossImpl)
    name: str = "custom"  # named size this config came from

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_name(cls, name: str, vocab_size: Optional[int] = None, **overrides) -> "LlamaConfig":
        """A named size (``SIZES``); ``vocab_size`` (default: the paper's) and fields may be overridden."""
        if name not in SIZES:
            raise ValueError(f"unknown model size {name!r}; known sizes: {', '.join(SIZES)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"unknown LlamaConfig field(s) {bad} in model overrides; fields: {', '.join(sorted(fields))}")
        kw = dict(SIZES[name], name=name)
        if vocab_size is not None:
            kw["vocab_size"] = vocab_size
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_recipe(cls, recipe: Mapping[str, Any], vocab_size: Optional[int] = None) -> "LlamaConfig":
        """The model of a resolved recipe (a ``config.RecipeConfig`` as a mapping): the named size
        ``model.size``, then ``model.vocab_size`` (else ``vocab_size``, else the size's), the
        recipe's RoPE base when set, the attention backend, loss chunking and loss implementation, then
        ``model.overrides``. ``max_seq_len`` is the context trained on, ``data.seq_len``, unless an
        override sets it (it may not be shorter than ``data.seq_len``).
        """
        model = recipe.get("model") or {}
        seq_len = (recipe.get("data") or {}).get("seq_len")
        vocab = model.get("vocab_size") or vocab_size
        extra = {k: model[k] for k in ("attention_backend", "loss_chunk_size", "loss_impl") if model.get(k) is not None}
        if model.get("rope_theta") is not None:
            extra["rope_theta"] = float(model["rope_theta"])
        if seq_len is not None:
            extra["max_seq_len"] = int(seq_len)
        overrides = dict(model.get("overrides") or {})
        if seq_len is not None and int(overrides.get("max_seq_len", seq_len)) < int(seq_len):
            raise ValueError(f"model.overrides.max_seq_len={overrides['max_seq_len']} is shorter than "
                             f"data.seq_len={seq_len} (fix: drop the override; max_seq_len follows data.seq_len)")
        extra.update(overrides)
        return cls.from_name(str(model.get("size", "tiny")), vocab_size=None if vocab is None else int(vocab), **extra)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count from the config alone (equals the instantiated model's)."""
        d, hd = self.d_model, self.head_dim
        attn = d * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * d
        mlp = 3 * d * self.d_mlp
        body = self.n_layers * (attn + mlp + 2 * d) + d  # two norms per block + final norm
        return body + (2 * self.vocab_size * d if embeddings else 0)


# Named sizes. megadocs (docs/papers.md, megadocs 1.3; vocab 128,256, context 4096) and MAGA
# (docs/papers.md, MAGA 11, corrected table: hidden 1024 for 134M, ffn 14336 / 18432 for 7B / 13B;
# head_dim 128; vocab 49,152, context 8192). MAGA's "total params" are non-embedding counts.
_MEGADOCS = dict(vocab_size=128256, max_seq_len=4096)
_MAGA = dict(vocab_size=49152, max_seq_len=8192)
SIZES: dict[str, dict] = {
    "nano": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=192, vocab_size=512, max_seq_len=256),
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_mlp=384, vocab_size=2048, max_seq_len=512),
    "small": dict(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=768, vocab_size=2048, max_seq_len=1024),
    "150m": dict(d_model=512, n_layers=6, n_heads=8, n_kv_heads=8, d_mlp=1792, **_MEGADOCS),
    "300m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_mlp=2688, **_MEGADOCS),
    "600m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, d_mlp=3584, **_MEGADOCS),
    "1_5b": dict(d_model=1536, n_layers=36, n_heads=16, n_kv_heads=8, d_mlp=5376, **_MEGADOCS),
    "maga_134m": dict(d_model=1024, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=4096, **_MAGA),
    "maga_377m": dict(d_model=1536, n_layers=10, n_heads=12, n_kv_heads=12, d_mlp=6144, **_MAGA),
    "maga_1_7b": dict(d_model=2560, n_layers=16, n_heads=20, n_kv_heads=20, d_mlp=10240, **_MAGA),
    "maga_7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_mlp=14336, **_MAGA),
    "maga_13b": dict(d_model=4096, n_layers=48, n_heads=32, n_kv_heads=8, d_mlp=18432, **_MAGA),
}


# ---------------------------------------------------------------------------------------------
# Hugging Face configs


def config_from_hf(hf: dict[str, Any], **overrides) -> LlamaConfig:
    """Our config from a HF Llama config.json; raises on features this model does not have."""
    arch = hf.get("model_type")
    if arch not in ("llama", None):
        raise ValueError(f"config.json has model_type {arch!r}; only Llama checkpoints can be imported")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if hf.get(key, ok) != ok:
            raise ValueError(f"config.json has {key}={hf[key]!r}; this model supports only {key}={ok!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"config.json uses RoPE scaling {rope!r}; only plain RoPE ('default') is supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ValueError(f"config.json has head_dim={hf['head_dim']} != hidden_size / heads = {d // heads}; not supported")
    kw = dict(
        d_model=d, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, d_mlp=hf["intermediate_size"],
        vocab_size=hf["vocab_size"], rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02), max_seq_len=hf.get("max_position_embeddings", 4096),
        name="hf",
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


# field -> how a recipe sets it (the fix named when an imported checkpoint disagrees)
_HF_MATCH = {
    "d_model": "model.size / model.overrides.d_model", "n_layers": "model.size / model.overrides.n_layers",
    "n_heads": "model.size / model.overrides.n_heads", "n_kv_heads": "model.size / model.overrides.n_kv_heads",
    "d_mlp": "model.size / model.overrides.d_mlp", "vocab_size": "model.vocab_size (and the tokenizer it came with)",
    "rope_theta": "model.rope_theta={}", "norm_eps": "model.overrides.norm_eps={}",
}


def check_hf_matches(ours: LlamaConfig, hf_config: Mapping[str, Any], where: str,
                     fields: Optional[Sequence[str]] = None) -> None:
    """Refuse, in one line, a HF Llama config.json whose architecture differs from ours.

    Shapes, vocabulary, RoPE base and RMSNorm epsilon must all agree: weights trained with
    another RoPE base or epsilon load without error but compute other logits.
    """
    theirs = config_from_hf(dict(hf_config))
    for f in fields or _HF_MATCH:
        a, b = getattr(theirs, f), getattr(ours, f)
        if a != b:
            fix = _HF_MATCH[f].format(a)
            raise ValueError(f"{where}: {f}={a} but the recipe's model has {f}={b} (fix: set {fix})")
