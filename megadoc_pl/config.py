"""Typed configuration: every recipe key, with a one-line description.

A recipe is ``recipes/methods/<NAME>.yaml`` (the method) composed with
``recipes/scales/<SCALE>.yaml`` (model and data size) and ``key=value`` overrides, validated
against these dataclasses (OmegaConf structured configs: unknown keys are errors). The
resolved config is saved in the run directory as ``config.yaml``.

Each section belongs to one part of the package; add fields to your own section only, always
with a default and a docstring-comment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class MixtureConfig:
    """How the streams are mixed (SPEC 4)."""

    mode: str = "paper"  # 'paper' (real_epochs + synthetic_fraction) or 'budget' (token budget + per-stream epochs/weights)
    real_epochs: float = 1.0  # E: passes over the real stream (paper mode)
    synthetic_fraction: float = 0.0  # w: fraction of training tokens drawn from the synthetic stream (paper mode), 0 <= w < 1
    budget_tokens: Optional[int] = None  # total training tokens (budget mode)
    stream_epochs: dict = field(default_factory=dict)  # budget mode: stream name -> epochs over its unique tokens
    stream_weights: dict = field(default_factory=dict)  # budget mode: stream name -> weight (share of the remaining budget)


@dataclass
class ValConfig:
    """Named validation sets (SPEC 6) and the held-out split decided before generation."""

    num_iid: int = 1000  # held-out real documents in the `iid` set
    num_long: int = 500  # held-out documents at or above long_threshold tokens in the `long` set
    num_short: int = 500  # held-out documents below short_threshold tokens in the `short` set
    long_threshold: int = 2048  # token length at or above which a held-out document is `long`
    short_threshold: int = 512  # token length below which a held-out document is `short`
    heldout_fraction: float = 0.0  # extra fraction of real documents held out (0: just the named sets)
    max_heldout_fraction: float = 0.1  # cap on all held-out documents as a fraction of the corpus; larger requests are scaled down (data/split.py)
    split_seed: int = 1234  # seed of the deterministic train/held-out split
    extra: dict = field(default_factory=dict)  # extra sets: name -> path of a document file (e.g. out-of-distribution)
    max_windows: Optional[int] = None  # cap on windows per validation set (None: all)
    scope: Optional[str] = None  # attention scope for validation (None: same as training)
    interval: int = 0  # validate every N training steps (0: only at the end)
    split_file: Optional[str] = None  # an existing split file to use instead of computing one


@dataclass
class DataConfig:
    """Where the corpus comes from and which corpus view / mixture to build (SPEC 3, 4)."""

    real: Optional[Any] = None  # real corpus: file, directory or list of them (None: the built-in demo world)
    synthetic: Optional[Any] = None  # generations: file, directory or list (None: generated for the demo)
    tokenizer: Optional[str] = None  # tokenizer.json or tokenizer directory (None: the demo tokenizer)
    text_field: str = "text"  # field holding the document text (dotted for nested, e.g. meta.raw_text)
    id_field: str = "id"  # field holding the document id (missing ids are derived from content)
    skip_bad_rows: bool = False  # skip and count bad input rows instead of stopping
    add_bos: bool = True  # prepend BOS to every stored document
    add_eos: bool = True  # append EOS to every stored document
    cache_dir: str = ".cache/megadoc_pl"  # token stores and demo artefacts are cached here
    rebuild: bool = False  # rebuild a token store whose fingerprints do not match instead of refusing
    view: str = "real"  # synthetic corpus view: real | rephrase | stitch | stretch | maga | maga_stitch
    generations: int = 0  # G: generations per source used by the view (the first G by gen_index)
    include_real: bool = True  # rephrase view: add the original document once to the synthetic stream
    real_position: str = "last"  # stitch views: where the original goes in a megadoc: last | first | none
    order: str = "generation"  # stitch views: order of generations inside a megadoc: generation | shuffled
    stretch_open: str = "<think>"  # stretch view: text opening an inserted rationale
    stretch_close: str = "</think>"  # stretch view: text closing an inserted rationale
    judge_min_score: Optional[int] = None  # maga views: drop reformulations with a judge score below this
    short_pool: str = "error"  # source with fewer than G generations: 'error' or 'drop' (recorded)
    seq_len: int = 4096  # tokens per training window (each window carries seq_len + 1 tokens)
    num_workers: int = 0  # DataLoader worker processes
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    val: ValConfig = field(default_factory=ValConfig)


@dataclass
class ModelConfigSection:
    """Model selection; the architecture itself is megadoc_pl.model.llama.LlamaConfig."""

    size: str = "tiny"  # named size (tiny, 150m, 300m, 600m, 1_5b, maga_134m, ...)
    vocab_size: Optional[int] = None  # None: taken from the tokenizer
    attention_backend: str = "auto"  # auto | flash_attn | torch_varlen | flex | sdpa
    attention_scope: str = "window"  # window | document | megadoc (SPEC 3.4)
    rope_theta: float = 10000.0  # RoPE base
    init_from: Optional[str] = None  # a Hugging Face Llama directory to import as initial weights
    loss_chunk_size: int = 1024  # tokens per chunk of the chunked cross-entropy
    overrides: dict = field(default_factory=dict)  # LlamaConfig fields to override (d_model, n_layers, ...)


@dataclass
class TrainConfig:
    """Optimisation and the Lightning Trainer (SPEC 5)."""

    global_batch_size: int = 64  # sequences per optimizer step, summed over ranks and accumulation
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_steps: Optional[int] = None  # None: derived from the mixture plan
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.1  # decoupled weight decay (per-step shrink lr * wd)
    betas: tuple = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    no_decay: tuple = ("norm", "bias", "embed")  # parameter-name substrings excluded from weight decay
    schedule: str = "cosine"  # cosine (warmup then cosine to 0) | wsd (warmup, stable, linear decay)
    warmup_fraction: float = 0.01  # fraction of steps in linear warmup
    decay_fraction: float = 0.2  # wsd: fraction of steps in the final decay
    grad_clip: float = 1.0  # global gradient-norm clip
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32-true on CPU) or any Lightning precision
    compile: bool = False  # torch.compile the model
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = "auto"  # devices per node
    num_nodes: int = 1  # nodes
    seed: int = 0  # model init / dropout seed (data order uses data_seed)
    data_seed: int = 42  # data order seed
    log_every: int = 1  # log scalars every N steps
    ckpt_every: int = 0  # save a checkpoint every N steps (0: only at the end)


@dataclass
class RunConfig:
    """Where the run directory goes (SPEC 3.5)."""

    root: str = "runs"  # parent of run directories
    name: Optional[str] = None  # run directory name (None: recipe-scale-timestamp)
    resume: Optional[str] = None  # 'last' (must exist), 'auto' (if one exists, else start fresh) or a checkpoint path: resume exactly from it


@dataclass
class SynthConfig:
    """How the demo (or a recipe without a synthetic path) generates what its view needs."""

    backend: str = "template"  # template (demo) | transformers | vllm | openai
    model: Optional[str] = None  # generator model path or name (LLM backends)
    style: str = "wikipedia"  # rephrase style
    maga_variant: str = "base"  # maga prompt variant: base | strict | relaxed
    judge: bool = False  # run the Limited Consistency judge (maga)


@dataclass
class EvalConfig:
    """Downstream evaluation during/after training (SPEC 6)."""

    tasks: dict = field(default_factory=dict)  # name -> JSONL multiple-choice file
    position_buckets: int = 32  # buckets of the loss-by-position curves
    doc_position_buckets: int = 24  # log2 buckets of the position within the document ({0}, [1,2), [2,4), ..., open last)
    downstream_every: int = 0  # score the eval.tasks every N optimizer steps (0: only at the end)
    downstream_batch_size: int = 16  # sequences per forward pass of the multiple-choice scoring
    downstream_limit: Optional[int] = None  # score only the first N questions of each task (None: all)


@dataclass
class DemoConfig:
    """The built-in procedural demo world (SPEC 9)."""

    num_documents: int = 3000  # documents in the demo world
    seed: int = 0  # world seed
    vocab_size: int = 2048  # demo tokenizer vocabulary


@dataclass
class RecipeConfig:
    """A full recipe: method + scale + overrides."""

    recipe: str = "baseline_real"  # method recipe name (recipes/methods/<name>.yaml)
    scale: str = "demo"  # scale preset name (recipes/scales/<name>.yaml)
    description: str = ""  # one line on what the recipe is
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfigSection = field(default_factory=ModelConfigSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
