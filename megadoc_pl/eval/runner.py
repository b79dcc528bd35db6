"""Offline evaluation of checkpoints, ensembles or HF models (what ``tools/evaluate.py`` runs).

The validation sets are rebuilt from the recipe exactly as training built them (same split,
stores, packing and attention scope), checked for held-out hygiene, and scored with the same
:class:`ValidationMetrics` as during training; multiple-choice tasks are scored with the
training tokenizer and BOS setting.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from megadoc_pl.data.batch import unpack
from megadoc_pl.errors import BadInput
from megadoc_pl.eval.ensemble import Ensemble
from megadoc_pl.eval.multiple_choice import MultipleChoiceScorer, evaluate_tasks, load_task
from megadoc_pl.eval.position import write_curves_csv
from megadoc_pl.eval.scoring import token_losses
from megadoc_pl.eval.validation import ValidationMetrics, loss_key

if TYPE_CHECKING:
    from megadoc_pl.checkpoints import LoadedModel


# ---------------------------------------------------------------------------------- inputs


def recipe_from_dict(cfg: Mapping[str, Any], overrides: Sequence[str] = (), where: str = "config") -> DictConfig:
    """A resolved recipe saved by a run (config.yaml or a checkpoint's hparams) as a typed config."""
    from megadoc_pl.config import RecipeConfig

    try:
        out = OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg)
        if overrides:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # OmegaConf's validation errors: keep the first line
        raise BadInput(f"{where}: {str(e).splitlines()[0]} (fix: correct or remove that key)") from None
    return out


def load_recipe_file(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such config file (fix: pass the run's config.yaml)")
    return recipe_from_dict(OmegaConf.load(path), overrides, str(path))


def load_models(checkpoints: Sequence[str] = (), hf: Optional[str] = None, device: Any = "cpu") -> list[LoadedModel]:
    """The models to evaluate (checkpoints or run directories, or one HF directory), each with
    its recipe and tokenizer (``megadoc_pl.checkpoints.load_model``)."""
    from megadoc_pl.checkpoints import load_model

    if bool(checkpoints) == bool(hf):
        raise BadInput("give either checkpoints or an HF directory (fix: --checkpoint CKPT [CKPT ...] or --hf DIR)")
    return [load_model(path, device=device) for path in (checkpoints or [hf])]


# ---------------------------------------------------------------------------------- validation


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_validation(
    model: Any,
    val_windows: Mapping[str, Any],
    seq_len: int,
    batch_size: int = 8,
    position_buckets: int = 32,
    doc_position_buckets: int = 24,
    device: Any = "cpu",
    precision: str = "auto",
    out_dir: Optional[str | Path] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Loss of every named validation set (packed batches moved to ``device``, then unpacked there).

    Returns ``{"val/<name>/loss": float, ...}`` and, per set, the token count; with
    ``out_dir`` the curves are written as ``loss_by_position_<name>.csv``.
    """
    device = torch.device(device)
    metrics = ValidationMetrics(list(val_windows), position_buckets=position_buckets, seq_len=seq_len,
                                doc_position_buckets=doc_position_buckets).to(device)
    for name, windows in val_windows.items():
        n = len(windows)
        for b0 in tqdm(range(0, n, batch_size), desc=f"val/{name}", disable=not progress, leave=False):
            batch = unpack(_to_device(windows.packed(list(range(b0, min(n, b0 + batch_size)))), device))
            with _autocast(device, precision):
                tok_loss_BT = token_losses(model, batch)
            metrics.update(name, tok_loss_BT.float(), batch)
    out: dict[str, Any] = {}
    for name, r in metrics.results().items():
        out[loss_key(name)] = r.loss
        out[f"val/{name}/tokens"] = r.tokens
        if out_dir is not None:
            write_curves_csv(Path(out_dir) / f"loss_by_position_{name}.csv", [r.window, r.document])
    return out


# ---------------------------------------------------------------------------------- all of it


@dataclass
class EvalSpec:
    """What to evaluate (the arguments of tools/evaluate.py)."""

    checkpoints: list[str] = field(default_factory=list)
    hf: Optional[str] = None
    ensemble: str = "logit"
    recipe: Optional[str] = None  # method recipe name or YAML
    config: Optional[str] = None  # a run's config.yaml
    overrides: list[str] = field(default_factory=list)
    tasks: dict[str, str] = field(default_factory=dict)
    sets: Optional[list[str]] = None  # restrict to these validation sets (None: all)
    validation: bool = True
    tokenizer: Optional[str] = None  # for tasks when no recipe gives one
    add_bos: Optional[bool] = None  # None: the recipe's data.add_bos (True without a recipe)
    batch_size: int = 8
    task_limit: Optional[int] = None
    device: str = "auto"
    precision: str = "auto"
    out_dir: Optional[str] = None  # where loss_by_position_<name>.csv go
    progress: bool = True


def _resolve_recipe(spec: EvalSpec, ckpt_cfg: Optional[dict]) -> Optional[DictConfig]:
    """The recipe evaluation rebuilds the validation sets from, validated here (the front door for
    tools/evaluate.py: preparation takes a validated recipe)."""
    cfg = _recipe_of(spec, ckpt_cfg)
    if cfg is not None:
        from megadoc_pl.recipes import validate_recipe

        validate_recipe(cfg)
    return cfg


def _recipe_of(spec: EvalSpec, ckpt_cfg: Optional[dict]) -> Optional[DictConfig]:
    if spec.config and spec.recipe:
        raise BadInput("give --recipe or --config, not both (fix: drop one of them)")
    if spec.config:
        return load_recipe_file(spec.config, spec.overrides)
    if spec.recipe:
        from megadoc_pl.recipes import load_recipe

        return load_recipe(spec.recipe, spec.overrides)
    if ckpt_cfg is not None:
        return recipe_from_dict(ckpt_cfg, spec.overrides, "checkpoint hyper_parameters['cfg']")
    return None


def run_evaluation(spec: EvalSpec) -> dict[str, Any]:
    """Load models, rebuild the validation sets, check hygiene, score sets and tasks."""
    from megadoc_pl.data.hygiene import check_units_disjoint

    device = torch.device("cuda" if spec.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if spec.device == "auto" else spec.device))
    loaded = load_models(spec.checkpoints, spec.hf, device)
    models = [m.model for m in loaded]
    cfg = _resolve_recipe(spec, loaded[0].recipe)
    tokenizer = spec.tokenizer or loaded[0].tokenizer  # for the tasks: given, else the model's own
    model: Any = models[0] if len(models) == 1 else Ensemble(models, mode=spec.ensemble).to(device).eval()

    result: dict[str, Any] = {
        "checkpoints": list(spec.checkpoints), "hf": spec.hf,
        "ensemble": spec.ensemble if len(models) > 1 else None, "members": len(models),
        "recipe": str(cfg.recipe) if cfg is not None else None,
        "scale": str(cfg.scale) if cfg is not None else None,
        "metrics": {},
    }
    prepared = None
    if cfg is not None and (spec.validation or (spec.tasks and tokenizer is None)):
        from megadoc_pl.data.prepare import prepare_corpus
        from megadoc_pl.demo import corpus_inputs

        prepared = prepare_corpus(cfg, corpus_inputs(cfg))  # the demo's world for a recipe without data.real

    if spec.validation:
        if prepared is None:
            raise BadInput("validation sets need the run's recipe (fix: --config RUN/config.yaml or --recipe NAME, "
                           "or --no-val to score tasks only)")
        val_units = dict(prepared.val_units)
        windows = prepared.val_windows()
        if spec.sets is not None:
            unknown = sorted(set(spec.sets) - set(windows))
            if unknown:
                raise BadInput(f"unknown validation set(s) {unknown} (fix: --sets takes some of {sorted(windows)})")
            windows = {k: v for k, v in windows.items() if k in spec.sets}
        check_units_disjoint([prepared.real_units, prepared.synthetic_units],
                             {k: v for k, v in val_units.items() if k in windows})
        val = evaluate_validation(
            model, windows, seq_len=int(cfg.data.seq_len), batch_size=spec.batch_size,
            position_buckets=int(cfg.eval.position_buckets), doc_position_buckets=int(cfg.eval.doc_position_buckets),
            device=device, precision=spec.precision, out_dir=spec.out_dir, progress=spec.progress,
        )
        result["metrics"].update({k: v for k, v in val.items() if k.endswith("/loss")})
        result["val_tokens"] = {k.split("/")[1]: v for k, v in val.items() if k.endswith("/tokens")}

    if spec.tasks:
        from megadoc_pl.data.tokenizer import load_tokenizer

        if spec.tokenizer is None and prepared is not None:
            tok = prepared.tokenizer
        elif tokenizer is not None:
            tok = load_tokenizer(tokenizer)
        else:
            raise BadInput("multiple-choice tasks need the training tokenizer (fix: --tokenizer PATH)")
        add_bos = spec.add_bos if spec.add_bos is not None else (bool(cfg.data.add_bos) if cfg is not None else True)
        max_length = int(cfg.data.seq_len) if cfg is not None else int(models[0].cfg.max_seq_len)
        scorer = MultipleChoiceScorer(tok, add_bos=add_bos, max_length=max_length, batch_size=spec.batch_size)
        tasks = {name: load_task(path, spec.task_limit) for name, path in spec.tasks.items()}
        with torch.no_grad(), _autocast(device, spec.precision):
            mc, per_task = evaluate_tasks(model, tasks, scorer, device=device, progress=spec.progress)
        result["metrics"].update(mc)
        result["tasks"] = {n: {"n": r.n, "acc": r.acc, "acc_norm": r.acc_norm} for n, r in per_task.items()}
        result["add_bos"] = add_bos
    result["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in result["metrics"].items()}
    return result
