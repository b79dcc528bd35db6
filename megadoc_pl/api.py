"""The package as a library: the training path's DataModule, LightningModule and Trainer settings
for your own Lightning code (docs/python-api.md).

    dm = megadoc_pl.datamodule("megadoc_stitch", ["train.max_steps=100"])  # validated, prepared
    model = megadoc_pl.lightning_module(dm)                                # MegadocLM for that data
    trainer = lightning.pytorch.Trainer(**megadoc_pl.trainer_kwargs(dm))
    trainer.fit(model, datamodule=dm)

Each half also works with a counterpart of your own: ``datamodule`` with your LightningModule
(it receives the batch contract), ``lightning_module`` with your DataModule (it must yield
contract batches). These functions are the steps of ``megadoc-pl fit`` (``train.run``: recipe
validation, ``prepare``, the seed, ``trainer_kwargs`` / ``step_settings``), not a second path:
the same recipe trains the same numbers either way. What ``fit`` adds on top (run directory,
checkpoints, throughput, final validation, metrics.json) stays there.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.errors import BadInput
from megadoc_pl.train import console, run
from megadoc_pl.train.module import MegadocLM

RecipeLike = Union[str, Mapping[str, Any], DictConfig]

__all__ = ["recipe", "datamodule", "lightning_module", "trainer_kwargs"]


def recipe(recipe_or_cfg: RecipeLike, overrides: Sequence[str] = ()) -> DictConfig:
    """A validated recipe: a method name or YAML path (as ``--recipe``; ``scale=NAME`` among the
    overrides picks the preset), or a config (a run's ``config.yaml`` loaded, a dict, a
    ``DictConfig``), with ``key=value`` overrides on top."""
    from megadoc_pl.recipes import compose_recipe, validate_recipe

    if isinstance(recipe_or_cfg, str):
        return compose_recipe(recipe_or_cfg, overrides)
    if not isinstance(recipe_or_cfg, (Mapping, DictConfig)):
        raise BadInput(f"a recipe is a name, a YAML path or a config, not {type(recipe_or_cfg).__name__} "
                       "(fix: pass e.g. 'megadoc_stitch' or megadoc_pl.recipe(...))")
    from megadoc_pl.eval.runner import recipe_from_dict

    cfg = recipe_from_dict(recipe_or_cfg, overrides)
    validate_recipe(cfg)
    return cfg


def datamodule(recipe_or_cfg: RecipeLike, overrides: Sequence[str] = ()) -> pl.LightningDataModule:
    """The training path's LightningDataModule of a recipe: validated and prepared (token stores,
    split, views, mixture plan; the built-in demo when ``data.real`` is not set).

    ``dm.cfg`` is the recipe completed from the data (``model.vocab_size``, ``train.max_steps``),
    what :func:`lightning_module` and :func:`trainer_kwargs` read; ``dm.prepared`` holds the rest
    (stores, split, plan). Its loaders ship packed batches that the datamodule unpacks on the
    device (``on_after_batch_transfer``): any LightningModule receives the batch contract.
    """
    cfg, dm = run.prepare(recipe(recipe_or_cfg, overrides))
    dm.cfg = cfg
    return dm


def _completed(cfg_or_datamodule: Any) -> DictConfig:
    """The recipe of a datamodule from :func:`datamodule`, or a recipe that names its vocabulary and steps."""
    if isinstance(cfg_or_datamodule, pl.LightningDataModule):
        cfg = getattr(cfg_or_datamodule, "cfg", None)
        if cfg is None:
            raise BadInput(f"{type(cfg_or_datamodule).__name__} carries no recipe (fix: pass the recipe, with "
                           "model.vocab_size and train.max_steps set, or a datamodule from megadoc_pl.datamodule)")
        return cfg
    cfg = recipe(cfg_or_datamodule)
    for key in ("model.vocab_size", "train.max_steps"):
        if OmegaConf.select(cfg, key) is None:
            raise BadInput(f"{key} is not set (fix: pass the datamodule from megadoc_pl.datamodule, which fills it "
                           f"in from the prepared data, or set {key}=N)")
    return cfg


def lightning_module(cfg_or_datamodule: Any) -> MegadocLM:
    """:class:`~megadoc_pl.train.module.MegadocLM` for a datamodule from :func:`datamodule` (its
    completed recipe) or for a recipe that sets ``model.vocab_size`` and ``train.max_steps``
    (to train on a DataModule of your own; :func:`recipe` applies overrides).

    As ``megadoc-pl fit`` does before it builds the module: ``train.num_threads`` is applied and
    every RNG is seeded with ``train.seed``, so a recipe starts from the same weights either way.
    """
    cfg = _completed(cfg_or_datamodule)
    console.quiet_third_party()  # the lines megadoc-pl fit silences too
    if cfg.train.num_threads is not None:
        torch.set_num_threads(int(cfg.train.num_threads))
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)
    return MegadocLM(OmegaConf.to_container(cfg, resolve=True))


def _world_size(cfg: DictConfig) -> int:
    """Ranks of ``train.devices`` x ``train.num_nodes`` as Lightning counts them (``auto``: every
    visible GPU, or one CPU process)."""
    devices = cfg.train.devices
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices in ("auto", -1):
        per_node = torch.cuda.device_count() if run.on_gpu(cfg) else 1
    elif isinstance(devices, int) and devices >= 1:
        per_node = devices
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        per_node = len(devices)
    else:
        raise BadInput(f"train.devices={devices!r}: cannot count the ranks from it (fix: pass world_size= "
                       "to trainer_kwargs, or set train.devices to a number)")
    return max(1, per_node) * int(cfg.train.num_nodes)


def trainer_kwargs(cfg_or_datamodule: Any, world_size: Optional[int] = None) -> dict[str, Any]:
    """``lightning.pytorch.Trainer`` arguments of a recipe, as ``megadoc-pl fit`` sets them.

    The ones the data needs: ``max_steps``, ``accumulate_grad_batches`` (global batch /
    (micro-batch x ``world_size``)), ``val_check_interval`` (``data.val.interval`` optimizer
    steps, in micro-batches), ``use_distributed_sampler=False`` (the datamodule shards windows by
    rank itself), ``max_epochs=-1``, ``check_val_every_n_epoch=None``; and the recipe's device,
    strategy, precision, clipping and logging settings. ``world_size`` defaults to
    ``train.devices`` x ``train.num_nodes``; pass it when you change those on the Trainer.
    Callbacks, logger and ``default_root_dir`` are yours to add.
    """
    if isinstance(cfg_or_datamodule, pl.LightningDataModule):
        cfg, dm = _completed(cfg_or_datamodule), cfg_or_datamodule
    else:
        cfg, dm = recipe(cfg_or_datamodule), None
    if cfg.train.max_steps is None:
        raise BadInput("train.max_steps is not set (fix: pass the datamodule from megadoc_pl.datamodule, or set "
                       "train.max_steps=N)")
    kw = run.trainer_kwargs(cfg)
    kw["strategy"] = run.build_strategy(cfg)
    kw.update(run.step_settings(cfg, world_size if world_size is not None else _world_size(cfg)))
    if dm is not None and not getattr(dm, "val_set_names", None):
        kw["limit_val_batches"] = 0
    return kw
