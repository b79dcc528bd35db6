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
from typing import Any, Literal, Optional

# Choice fields: the one place their values are listed (OmegaConf and the CLI both enforce them).
View = Literal["real", "rephrase", "stitch", "stretch", "stitch_stretch", "maga", "maga_stitch", "self_distill"]
Scope = Literal["window", "document", "megadoc"]
RealPosition = Literal["last", "first", "none"]
Order = Literal["generation", "shuffled"]
ShortPool = Literal["error", "drop"]
MixtureMode = Literal["paper", "budget"]
AttentionBackend = Literal["auto", "flash_attn", "torch_varlen", "flex", "sdpa"]
LossImpl = Literal["auto", "chunked", "compiled", "liger"]
Schedule = Literal["cosine", "wsd"]
SynthBackend = Literal["template", "transformers", "vllm", "openai"]
MagaVariant = Literal["base", "strict", "relaxed"]
WindowOrder = Literal["shuffled", "sequential"]


@dataclass
class MixtureConfig:
    """How the streams are mixed (docs/data-corpus.md)."""

    mode: MixtureMode = "paper"
    """'paper' (real_epochs + synthetic_fraction) or 'budget' (token budget + per-stream epochs/weights)."""

    real_epochs: float = 1.0
    """E: passes over the real stream (paper mode)."""

    synthetic_fraction: float = 0.0
    """w: fraction of training tokens drawn from the synthetic stream (paper mode), 0 <= w < 1."""

    budget_tokens: Optional[int] = None
    """Total training tokens (budget mode)."""

    stream_epochs: dict[str, float] = field(default_factory=dict)
    """Budget mode: stream name -> epochs over its unique tokens."""

    stream_weights: dict[str, float] = field(default_factory=dict)
    """Budget mode: stream name -> weight (share of the remaining budget)."""


@dataclass
class ValConfig:
    """Named validation sets (docs/evaluation.md) and the held-out split decided before generation."""

    num_iid: int = 1000
    """Held-out real documents in the `iid` set."""

    num_long: int = 500
    """Held-out documents at or above long_threshold tokens in the `long` set."""

    num_short: int = 500
    """Held-out documents below short_threshold tokens in the `short` set."""

    long_threshold: int = 2048
    """Token length at or above which a held-out document is `long`."""

    short_threshold: int = 512
    """Token length below which a held-out document is `short`."""

    heldout_fraction: float = 0.0
    """Extra fraction of real documents held out (0: just the named sets)."""

    max_heldout_fraction: float = 0.1
    """Cap on all held-out documents as a fraction of the corpus; larger requests are scaled down (data/split.py)."""

    split_seed: int = 1234
    """Seed of the deterministic train/held-out split."""

    extra: dict[str, str] = field(default_factory=dict)
    """Extra sets: name -> path of a document file (e.g. out-of-distribution)."""

    max_windows: Optional[int] = None
    """Cap on windows per validation set (None: all)."""

    scope: Optional[Scope] = None
    """Attention scope for validation (None: same as training)."""

    interval: int = 0
    """Validate every N training steps (0: only at the end)."""

    split_file: Optional[str] = None
    """An existing split file to use instead of computing one."""


@dataclass
class DataConfig:
    """Where the corpus comes from and which corpus view / mixture to build (docs/data-ingest.md, docs/data-corpus.md)."""

    real: Optional[Any] = None
    """Real corpus: file, directory or list of them (None: the built-in demo world)."""

    synthetic: Optional[Any] = None
    """Generations: file, directory or list (None: generated for the demo)."""

    tokenizer: Optional[str] = None
    """Tokenizer.json or tokenizer directory (None: the demo tokenizer)."""

    text_field: str = "text"
    """Field holding the document text (dotted for nested, e.g. meta.raw_text)."""

    id_field: str = "id"
    """Field holding the document id (missing ids are derived from content)."""

    skip_bad_rows: bool = False
    """Skip and count bad input rows instead of stopping."""

    add_bos: bool = True
    """Prepend BOS to every stored document."""

    add_eos: bool = True
    """Append EOS to every stored document."""

    cache_dir: str = ".cache/megadoc_pl"
    """Token stores and demo artefacts are cached here."""

    rebuild: bool = False
    """Rebuild a token store whose fingerprints do not match instead of refusing."""

    view: View = "real"
    """Synthetic corpus view: real | rephrase | stitch | stretch | maga | maga_stitch | self_distill."""

    generations: int = 0
    """G: generations per source used by the view (the first G by gen_index)."""

    include_real: bool = True
    """Rephrase / self_distill views: add the original document once to the synthetic stream."""

    real_position: RealPosition = "last"
    """Stitch views: where the original goes in a megadoc: last | first | none."""

    order: Order = "generation"
    """Stitch views: order of generations inside a megadoc: generation | shuffled."""

    stretch_open: str = "<think>"
    """Stretch view: text opening an inserted rationale."""

    stretch_close: str = "</think>"
    """Stretch view: text closing an inserted rationale."""

    judge_min_score: Optional[int] = None
    """Maga views: drop reformulations with a judge score below this."""

    short_pool: ShortPool = "error"
    """Source with fewer than G generations: 'error' or 'drop' (recorded)."""

    drop_heldout_generations: bool = False
    """Drop generations of held-out documents found in data.synthetic, with a warning (default: refuse them)."""

    seq_len: int = 4096
    """Tokens per training window (each window carries seq_len + 1 tokens)."""

    window_order: WindowOrder = "shuffled"
    """Training windows of each pass: 'shuffled' (seeded permutation, the papers' loader) or 'sequential' (stream order)."""

    real_fraction: float = 1.0
    """Train on this fraction of the real training sources (a deterministic nested subset, 0 < f <= 1; 1: all)."""

    real_fraction_seed: Optional[int] = None
    """Seed of the data.real_fraction draw (default: train.data_seed, so each data seed draws its own subset);
    fix it to vary a sweep's seeds over one subset (initialisation and window order only)."""

    num_workers: int = 0
    """DataLoader worker processes."""

    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    val: ValConfig = field(default_factory=ValConfig)


@dataclass
class ModelConfigSection:
    """Model selection; the architecture itself is megadoc_pl.model.llama.LlamaConfig."""

    size: str = "tiny"
    """Named size (tiny, 150m, 300m, 600m, 1_5b, maga_134m, ...)."""

    vocab_size: Optional[int] = None
    """None: taken from the tokenizer."""

    attention_backend: AttentionBackend = "auto"
    """Auto | flash_attn | torch_varlen | flex | sdpa."""

    attention_scope: Scope = "window"
    """Window | document | megadoc (docs/data-corpus.md)."""

    rope_theta: Optional[float] = None
    """RoPE base (None: the named size's)."""

    init_from: Optional[str] = None
    """A Hugging Face Llama directory to import as initial weights."""

    loss_chunk_size: int = 1024
    """Tokens per chunk of the chunked cross-entropy."""

    loss_impl: LossImpl = "auto"
    """LM-head loss: auto (compiled on CUDA, else chunked) | chunked | compiled | liger (CUDA, extra liger)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """LlamaConfig fields to override (d_model, n_layers, ...)."""


@dataclass
class TrainConfig:
    """Optimisation and the Lightning Trainer (docs/training.md)."""

    global_batch_size: int = 64
    """Sequences per optimizer step, summed over ranks and accumulation."""

    micro_batch_size: int = 8
    """Sequences per forward pass on one rank."""

    max_steps: Optional[int] = None
    """None: derived from the mixture plan."""

    lr: float = 1e-3
    """Peak learning rate."""

    weight_decay: float = 0.1
    """Decoupled weight decay (per-step shrink lr * wd)."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    eps: float = 1e-8
    """AdamW epsilon."""

    no_decay: tuple[str, ...] = ("norm", "bias", "embed")
    """Parameter-name substrings excluded from weight decay."""

    schedule: Schedule = "cosine"
    """Cosine (warmup then cosine to 0) | wsd (warmup, stable, linear decay)."""

    warmup_fraction: float = 0.01
    """Fraction of steps in linear warmup."""

    decay_fraction: float = 0.2
    """Wsd: fraction of steps in the final decay."""

    grad_clip: float = 1.0
    """Global gradient-norm clip."""

    precision: str = "auto"
    """Auto (bf16-mixed on GPU, 32-true on CPU) or any Lightning precision."""

    compile: bool = False
    """Torch.compile the model."""

    strategy: str = "auto"
    """auto | ddp | fsdp | fsdp2 (per-parameter sharding, meta-device init: 1.5B and up) | any Lightning strategy name."""

    num_threads: Optional[int] = None
    """torch intra-op threads on the CPU (None: torch's default). On shared cores 1 thread per run is several times faster than the default."""

    sharded_checkpoints: bool = False
    """fsdp2: every rank writes its own shards (a torch.distributed.checkpoint directory per checkpoint) instead of gathering the full state on rank 0; export and evaluation consolidate them."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, about a third more compute)."""

    accelerator: str = "auto"
    """Auto | cpu | gpu."""

    devices: Any = "auto"
    """Devices per node."""

    num_nodes: int = 1
    """Nodes."""

    seed: int = 0
    """Model init / dropout seed (data order uses data_seed)."""

    data_seed: int = 42
    """Data order seed."""

    log_every: int = 1
    """Log scalars every N steps."""

    ckpt_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""


@dataclass
class RunConfig:
    """Where the run directory goes (docs/training.md, "Run directory")."""

    root: str = "runs"
    """Parent of run directories."""

    name: Optional[str] = None
    """Run directory name (None: recipe-scale-timestamp)."""

    resume: Optional[str] = None
    """'last' (must exist), 'auto' (if one exists, else start fresh) or a checkpoint path: resume exactly from it."""


@dataclass
class SynthConfig:
    """How the demo (or a recipe without a synthetic path) generates what its view needs."""

    backend: SynthBackend = "template"
    """Template (demo) | transformers | vllm | openai."""

    model: Optional[str] = None
    """Generator model path or name (LLM backends)."""

    style: str = "wikipedia"
    """Rephrase style."""

    maga_variant: MagaVariant = "base"
    """Maga prompt variant: base | strict | relaxed."""

    judge: bool = False
    """Run the Limited Consistency judge (maga)."""


@dataclass
class EvalConfig:
    """Downstream evaluation during/after training (docs/evaluation.md)."""

    tasks: dict[str, str] = field(default_factory=dict)
    """Name -> JSONL multiple-choice file."""

    position_buckets: int = 32
    """Buckets of the loss-by-position curves."""

    doc_position_buckets: int = 24
    """Log2 buckets of the position within the document ({0}, [1,2), [2,4), ..., open last)."""

    downstream_every: int = 0
    """Score the eval.tasks every N optimizer steps (0: only at the end)."""

    downstream_batch_size: int = 16
    """Sequences per forward pass of the multiple-choice scoring."""

    downstream_limit: Optional[int] = None
    """Score only the first N questions of each task (None: all)."""


@dataclass
class DemoConfig:
    """The built-in procedural demo world (docs/demo.md)."""

    num_documents: int = 3000
    """Documents in the demo world."""

    seed: int = 0
    """World seed."""

    vocab_size: int = 2048
    """Demo tokenizer vocabulary."""


@dataclass
class RecipeConfig:
    """A full recipe: method + scale + overrides."""

    recipe: str = "baseline_real"
    """Method recipe name (recipes/methods/<name>.yaml)."""

    scale: str = "demo"
    """Scale preset name (recipes/scales/<name>.yaml)."""

    description: str = ""
    """One line on what the recipe is."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfigSection = field(default_factory=ModelConfigSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


# ---------------------------------------------------------------------------------------------
# The schema's own documentation


def field_docs(cls: type = RecipeConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the field's attribute docstring, for every field of the schema (sections too)."""
    import ast
    import dataclasses
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    out = {}
    for f in dataclasses.fields(cls):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub):
            out[prefix + f.name] = " ".join((sub.__doc__ or "").split())
            out.update(field_docs(sub, f"{prefix}{f.name}."))
        elif f.name in docs:
            out[prefix + f.name] = docs[f.name]
    return out


def commented_yaml(cfg: Any) -> str:
    """The resolved recipe as YAML with each key's documentation as a comment above it.

    What a run directory's ``config.yaml`` holds: it loads back as plain YAML (``OmegaConf.load``,
    ``megadoc-pl fit --config``) and explains every key to whoever opens it.
    """
    from omegaconf import OmegaConf

    docs = field_docs()
    lines = ["# megadoc_pl recipe, resolved (every key documented in megadoc_pl/config.py)"]
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    for line in OmegaConf.to_yaml(cfg, resolve=True).splitlines():
        stripped = line.lstrip(" ")
        indent = len(line) - len(stripped)
        key, sep, _ = stripped.partition(":")
        if not sep or stripped.startswith("- ") or " " in key:
            lines.append(line)
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        stack.append((indent, key))
        if dotted in docs and docs[dotted]:
            lines.append(" " * indent + "# " + docs[dotted])
        lines.append(line)
    return "\n".join(lines) + "\n"
