"""Recipe loader: method YAML + scale YAML + ``key=value`` overrides -> a typed config.

Precedence, lowest first: the schema defaults of :class:`megadoc_pl.config.RecipeConfig` <
``recipes/methods/<recipe>.yaml`` < ``recipes/scales/<scale>.yaml`` < command-line overrides.
``scale=NAME`` among the overrides selects the preset (default: the schema's ``demo``).
Unknown recipe names, scale names and keys are one-line errors listing what exists, and
:func:`validate_recipe` checks every value that can be checked without data (the model it
builds, the view options, the optimiser and mixture numbers) before anything is prepared.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from megadoc_pl.config import RecipeConfig
from megadoc_pl.errors import BadInput

if TYPE_CHECKING:
    from megadoc_pl.model.config import LlamaConfig


def recipes_dir() -> Path:
    """``$MEGADOC_RECIPES`` or the ``recipes/`` folder beside the package."""
    env = os.environ.get("MEGADOC_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "recipes"


def list_recipes(kind: str = "methods") -> list[str]:
    """Names of the method recipes (``kind='methods'``) or scale presets (``'scales'``)."""
    d = recipes_dir() / kind
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _yaml(kind: str, name: str) -> tuple[Path, DictConfig]:
    what = "recipe" if kind == "methods" else "scale"
    available = ", ".join(list_recipes(kind)) or "(none)"
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"{name}: no such {what} file (fix: check the path, or name one of: {available})")
    else:
        path = recipes_dir() / kind / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown {what} {name!r}; available: {available}")
    try:
        conf = OmegaConf.load(path)
    except Exception as e:  # YAML syntax error: one line naming the file
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, DictConfig):
        raise ValueError(f"{path}: a recipe file must be a mapping of keys")
    return path, conf


def _merge(base: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e).splitlines()[0]
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        known = ", ".join(node.keys()) if isinstance(node, DictConfig) else ""
        raise ValueError(f"{where}: unknown key '{key}' (known keys{' in ' + parent if parent else ''}: {known})") from None
    except ValidationError as e:
        key = getattr(e, "full_key", "")
        raise ValueError(f"{where}: bad value for '{key}': {str(e).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None


def _parse_overrides(overrides: Sequence[str]) -> tuple[Optional[str], list[str]]:
    scale, rest = None, []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. data.seq_len=512 or scale=paper_300m)")
        key, value = item.split("=", 1)
        if key.strip() == "scale":
            scale = value.strip()
        else:
            rest.append(item)
    return scale, rest


def load_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The resolved recipe ``name`` (a method name or a YAML path) at the chosen scale, with overrides."""
    scale, dotlist = _parse_overrides(overrides)
    cfg = OmegaConf.structured(RecipeConfig)
    path, method = _yaml("methods", name)
    if "scale" in method and scale is None:
        scale = str(method.scale)
    cfg = _merge(cfg, method, str(path))
    scale = scale or str(cfg.scale)
    spath, preset = _yaml("scales", scale)
    for key in ("recipe", "scale", "description"):
        if key in preset:
            raise ValueError(f"{spath}: a scale preset may not set '{key}'")
    cfg = _merge(cfg, preset, str(spath))
    for item in dotlist:  # one at a time, so a bad value is named
        try:
            OmegaConf.from_dotlist([item])
        except Exception as e:  # OmegaConf or YAML syntax (e.g. a {...} value split by the shell)
            first = " ".join(str(e).split())[:160]
            raise ValueError(f"override {item!r}: not a valid value ({first}) (fix: quote the whole "
                             "key=value, e.g. 'model.overrides={d_model: 64}')") from None
    cli = OmegaConf.from_dotlist(dotlist)
    cfg = _merge(cfg, cli, "command-line override")
    cfg.recipe = path.stem
    cfg.scale = spath.stem
    return cfg


def validate_recipe(cfg: DictConfig) -> None:
    """Every check a resolved recipe can get before data is read or a run directory exists.

    Choice fields are checked by their ``Literal`` types when the recipe is composed; this adds
    the rest: the model config is built (size, overrides, attention backend, sequence length),
    the view options are checked, and the optimiser, batch, mixture and validation numbers must
    be in range. Raises ``ValueError`` with one line naming the key and the fix.
    """
    from megadoc_pl.data.views import ViewOptions
    from megadoc_pl.model.config import LlamaConfig

    try:
        model = LlamaConfig.from_recipe(OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, TypeError) as e:
        raise ValueError(f"model: {e}") from None
    _check_backend_device(cfg)
    if cfg.train.sharded_checkpoints and cfg.train.strategy != "fsdp2":
        raise ValueError(f"train.sharded_checkpoints=true needs train.strategy=fsdp2, not {cfg.train.strategy} "
                         "(fix: set train.strategy=fsdp2 or drop train.sharded_checkpoints)")
    if cfg.model.init_from and cfg.train.strategy == "fsdp2":
        raise ValueError("model.init_from with train.strategy=fsdp2 is not supported yet (the model is built on the "
                         "meta device and initialised shard by shard) (fix: train.strategy=fsdp or ddp)")
    if cfg.model.init_from:
        _check_init_from(str(cfg.model.init_from), model, vocab_known=cfg.model.vocab_size is not None)
    ViewOptions.from_config(cfg.data, int(cfg.train.data_seed)).validate()
    t, mix, val = cfg.train, cfg.data.mixture, cfg.data.val
    checks = [
        ("train.lr", t.lr, t.lr > 0, "> 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.eps", t.eps, t.eps > 0, "> 0"),
        ("train.betas", list(t.betas), all(0 <= b < 1 for b in t.betas), "two numbers in [0, 1)"),
        ("train.warmup_fraction", t.warmup_fraction, 0 <= t.warmup_fraction <= 1, "in [0, 1]"),
        ("train.decay_fraction", t.decay_fraction, 0 <= t.decay_fraction <= 1, "in [0, 1]"),
        ("train.grad_clip", t.grad_clip, t.grad_clip >= 0, ">= 0 (0: no clipping)"),
        ("train.global_batch_size", t.global_batch_size, t.global_batch_size >= 1, ">= 1"),
        ("train.micro_batch_size", t.micro_batch_size, 1 <= t.micro_batch_size <= t.global_batch_size,
         f">= 1 and <= train.global_batch_size ({t.global_batch_size})"),
        ("train.max_steps", t.max_steps, t.max_steps is None or t.max_steps >= 1, ">= 1 (or null: the plan's)"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.ckpt_every", t.ckpt_every, t.ckpt_every >= 0, ">= 0 (0: only at the end)"),
        ("train.num_nodes", t.num_nodes, t.num_nodes >= 1, ">= 1"),
        ("data.seq_len", cfg.data.seq_len, cfg.data.seq_len >= 1, ">= 1"),
        ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, ">= 0"),
        ("data.real_fraction", cfg.data.real_fraction, 0 < cfg.data.real_fraction <= 1, "in (0, 1]"),
        ("train.num_threads", t.num_threads, t.num_threads is None or t.num_threads >= 1, ">= 1 (or null: torch's default)"),
        ("data.val.interval", val.interval, val.interval >= 0, ">= 0 (0: only at the end)"),
        ("data.val.max_windows", val.max_windows, val.max_windows is None or val.max_windows >= 1, ">= 1 (or null: all)"),
        ("model.loss_chunk_size", cfg.model.loss_chunk_size, cfg.model.loss_chunk_size >= 1, ">= 1"),
    ]
    for key in ("num_iid", "num_long", "num_short"):
        checks.append((f"data.val.{key}", val[key], val[key] >= 0, ">= 0"))
    if mix.mode == "paper":
        checks += [("data.mixture.real_epochs", mix.real_epochs, mix.real_epochs > 0, "> 0"),
                   ("data.mixture.synthetic_fraction", mix.synthetic_fraction, 0 <= mix.synthetic_fraction < 1,
                    "in [0, 1)")]
    else:
        checks.append(("data.mixture.budget_tokens", mix.budget_tokens,
                       mix.budget_tokens is None or mix.budget_tokens > 0, "> 0 (or null: the stream epochs decide)"))
    for key, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"{key}={value}: must be {rule} (fix: set {key} in the recipe or as an override)")
    resume = cfg.run.resume
    if resume not in (None, "last", "auto") and not Path(str(resume)).exists():
        raise ValueError(f"run.resume={resume}: not 'last', 'auto' or an existing checkpoint file")


# Lightning precisions whose activations are fp32/fp64: flash_attn and torch_varlen need bf16/fp16.
_FULL_PRECISIONS = ("32", "32-true", "64", "64-true")


def _check_backend_device(cfg: DictConfig) -> None:
    """flash_attn and torch_varlen run on CUDA in bf16/fp16 only (``model.attention.resolve_backend``);
    an explicit CPU accelerator or fp32/fp64 precision would fail at the first forward, after the
    data is prepared. ``auto`` values depend on the machine and are left to that check."""
    backend, accelerator = str(cfg.model.attention_backend), str(cfg.train.accelerator)
    precision = str(cfg.train.precision)
    if backend not in ("flash_attn", "torch_varlen"):
        return
    if accelerator == "cpu":
        raise BadInput(f"model.attention_backend={backend} needs a CUDA GPU but train.accelerator=cpu "
                       "(fix: set model.attention_backend=sdpa or flex to train on the CPU, or train on a GPU "
                       "with train.accelerator=gpu)")
    if precision in _FULL_PRECISIONS:
        raise BadInput(f"model.attention_backend={backend} needs bf16/fp16 activations but "
                       f"train.precision={precision} (fix: set train.precision=bf16-mixed, or "
                       "model.attention_backend=sdpa or flex for full precision)")


def _check_init_from(path: str, model: LlamaConfig, vocab_known: bool) -> None:
    """model.init_from: a HF Llama directory whose config.json matches the recipe's model (vocabulary
    checked once known: here when model.vocab_size is set, else when the weights are loaded)."""
    import json

    from megadoc_pl.model.config import check_hf_matches

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"model.init_from={path}: no config.json there (fix: a directory saved with save_pretrained)")
    fields = [f for f in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp", "vocab_size", "rope_theta",
                          "norm_eps") if vocab_known or f != "vocab_size"]
    check_hf_matches(model, json.loads(config.read_text(encoding="utf-8")), f"model.init_from={path}", fields)


def compose_recipe(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """:func:`load_recipe`, then :func:`validate_recipe`: what every entry point starts from."""
    cfg = load_recipe(name, overrides)
    validate_recipe(cfg)
    return cfg


def describe_all() -> str:
    """One line per method recipe and per scale preset (``--list``)."""
    lines = ["method recipes:"]
    for n in list_recipes("methods"):
        _, conf = _yaml("methods", n)
        lines.append(f"  {n:24s} {conf.get('description', '')}")
    lines.append("scale presets:")
    for n in list_recipes("scales"):
        spath, conf = _yaml("scales", n)
        first = spath.read_text(encoding="utf-8").splitlines()[:1]
        note = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"  {n:24s} {note or _scale_summary(conf)}")
    return "\n".join(lines)


def _scale_summary(conf: DictConfig) -> str:
    model = OmegaConf.select(conf, "model.size", default="?")
    seq = OmegaConf.select(conf, "data.seq_len", default="?")
    gb = OmegaConf.select(conf, "train.global_batch_size", default="?")
    return f"model {model}, seq_len {seq}, global batch {gb}"
