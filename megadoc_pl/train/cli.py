"""``megadoc-pl``: Lightning's CLI over the same recipes as ``recipes/train.py``.

::

    megadoc-pl fit --recipe megadoc_stitch --scale paper_300m --set data.real=real/ \\
        --trainer.num_nodes 4 --trainer.devices 8
    megadoc-pl fit --recipe megadoc_stitch --set run.name=stitch-a --resume      # continue last.ckpt
    megadoc-pl validate --recipe megadoc_stitch --set run.name=stitch-a --ckpt_path last
    megadoc-pl fit --recipe megadoc_stitch --print_config > stitch.yaml          # everything, resolved
    megadoc-pl fit --config stitch.yaml                                          # ... and back

How the two configuration systems meet: ``--recipe/--scale/--set`` are read first and resolved by
:func:`megadoc_pl.recipes.load_recipe` (the same files, precedence and errors as
``recipes/train.py``). The resolved recipe becomes the default of the ``recipe_config`` argument
and the recipe's Trainer settings (devices, nodes, strategy, precision, steps, clipping, logging)
become the ``trainer.*`` defaults, so ``--print_config`` shows the whole run and any
``--trainer.*`` flag overrides the recipe. Model and data are not LightningCLI sections: they are
built from ``recipe_config`` by :func:`megadoc_pl.train.run.setup_run`, exactly as for
``recipes/train.py``. Trainer flags that correspond to recipe keys (devices, num_nodes,
accelerator, strategy, precision, max_steps, gradient_clip_val, log_every_n_steps) are written
back into the recipe so ``config.yaml`` records what ran.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from megadoc_pl.utils import require

# Trainer argument -> recipe key it mirrors
_TRAINER_TO_RECIPE = {
    "accelerator": "train.accelerator",
    "devices": "train.devices",
    "num_nodes": "train.num_nodes",
    "strategy": "train.strategy",
    "precision": "train.precision",
    "max_steps": "train.max_steps",
    "gradient_clip_val": "train.grad_clip",
    "log_every_n_steps": "train.log_every",
}


def _pre_parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--scale", default=None)
    pre.add_argument("--set", action="append", default=[], dest="overrides")
    pre.add_argument("--resume", nargs="?", const="true", default="false",
                     type=lambda v: str(v).lower() in ("1", "true", "yes"))
    return pre.parse_known_args(list(argv))


def _recipe_from_args(known: argparse.Namespace):
    from megadoc_pl.recipes import load_recipe

    overrides = list(known.overrides)
    if known.scale:
        overrides.append(f"scale={known.scale}")
    if known.resume:
        overrides.append("run.resume=last")
    return load_recipe(known.recipe or "baseline_real", overrides)


def _build_cli_class():
    require("jsonargparse", "cli", "the megadoc-pl command (pip install 'jsonargparse[signatures]>=4.39')")
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.train import run as run_mod

    class MegadocCLI(LightningCLI):
        """LightningCLI whose model and data come from a megadoc_pl recipe."""

        def __init__(self, recipe_cfg: Any, recipe_args: argparse.Namespace, args: Optional[list[str]] = None):
            self.recipe_cfg = recipe_cfg
            self.recipe_args = recipe_args
            self.run: Optional[run_mod.TrainingRun] = None
            defaults = _recipe_trainer_defaults(recipe_cfg)
            self._recipe_trainer_defaults = defaults
            super().__init__(
                model_class=None, datamodule_class=None, save_config_callback=None, trainer_defaults=defaults,
                seed_everything_default=False, auto_configure_optimizers=False, load_from_checkpoint_support=False,
                parser_kwargs={"description": "megadoc_pl training with Lightning's CLI (recipes + trainer flags)"},
                args=args,
            )

        # --------------------------------------------------------------------- parser

        def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(self.trainer_class, "trainer")
            parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items()})

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            a = self.recipe_args
            parser.add_argument("--recipe", type=Optional[str], default=a.recipe,
                                help="method recipe name (recipes/methods/NAME.yaml) or a YAML path")
            parser.add_argument("--scale", type=Optional[str], default=a.scale, help="scale preset name")
            parser.add_argument("--set", type=list[str], default=list(a.overrides),
                                help="recipe overrides key=value (repeat --set for several)")
            parser.add_argument("--resume", type=bool, default=bool(a.resume),
                                help="continue the run's checkpoints/last.ckpt (run.resume=last)")
            parser.add_argument("--recipe_config", type=dict,
                                default=OmegaConf.to_container(self.recipe_cfg, resolve=True),
                                help="the resolved recipe (filled from --recipe/--scale/--set; a --config file may give it)")

        def _parse_ckpt_path(self) -> None:
            """Checkpoints carry the recipe in hparams['cfg']; nothing to merge into the CLI config."""

        # --------------------------------------------------------------------- instantiate

        def instantiate_classes(self) -> None:
            self.config_init = self.parser.instantiate_classes(self.config)
            section = self.config_init.get(str(self.subcommand), self.config_init)
            cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), section["recipe_config"])
            trainer_args = dict(section["trainer"])
            overrides = _trainer_overrides(trainer_args, self._recipe_trainer_defaults, cfg)
            self.run = run_mod.setup_run(cfg, overrides, stage=self.subcommand or "fit")
            self.model, self.datamodule, self.trainer = self.run.module, self.run.datamodule, self.run.trainer

        # --------------------------------------------------------------------- subcommands

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {
                "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
                "validate": {"model", "dataloaders", "datamodule"},
            }

        def fit(self, model: Any = None, datamodule: Any = None, ckpt_path: Optional[str] = None, **_: Any) -> None:
            assert self.run is not None
            if ckpt_path:
                self.run.ckpt_path = _checkpoint(self.run, ckpt_path)
            run_dir = self.run.fit()
            if self.trainer.is_global_zero:
                print(f"run directory: {run_dir}")

        def validate(self, model: Any = None, datamodule: Any = None, ckpt_path: Optional[str] = None,
                     **_: Any) -> None:
            assert self.run is not None
            ckpt = _checkpoint(self.run, ckpt_path) if ckpt_path else None
            values = self.run.validate(str(ckpt) if ckpt else None)
            if self.trainer.is_global_zero:
                print(json.dumps(values, indent=2, sort_keys=True))

    return MegadocCLI, Trainer


def _recipe_trainer_defaults(cfg: Any) -> dict[str, Any]:
    from megadoc_pl.train.run import trainer_kwargs

    return trainer_kwargs(cfg)


def _trainer_overrides(trainer_args: dict, recipe_defaults: dict, cfg: Any) -> dict[str, Any]:
    """Trainer flags that differ from the recipe's (or Lightning's) defaults.

    Flags that mirror a recipe key are written into ``cfg`` (so config.yaml records them) and
    rebuilt from there; the others are returned as Trainer overrides.
    """
    from lightning.pytorch import Trainer

    signature = {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()}
    out: dict[str, Any] = {}
    for key, value in trainer_args.items():
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # jsonargparse keeps '--trainer.devices 2' as the string '2'
        default = recipe_defaults[key] if key in recipe_defaults else signature.get(key, value)
        if value == default:
            continue
        if key in _TRAINER_TO_RECIPE:
            if key == "max_steps" and value in (-1, None):
                continue
            OmegaConf.update(cfg, _TRAINER_TO_RECIPE[key], value, merge=False)
        else:
            out[key] = value
    return out


def _checkpoint(run: Any, ckpt_path: str) -> Path:
    from megadoc_pl.train import rundir

    if ckpt_path in ("last", "auto"):
        path = run.run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT
        if not path.is_file():
            raise SystemExit(f"error: --ckpt_path {ckpt_path}: {path} does not exist (give run.name of a trained run)")
        return path
    path = Path(ckpt_path)
    if not path.is_file():
        raise SystemExit(f"error: --ckpt_path {ckpt_path}: no such file")
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``megadoc-pl``."""
    from megadoc_pl.train.callbacks import NonFiniteLossError

    argv = list(sys.argv[1:] if argv is None else argv)
    known, rest = _pre_parse(argv)
    try:
        cfg = _recipe_from_args(known)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    cli_cls, _ = _build_cli_class()
    # we hand LightningCLI the arguments left after reading --recipe/--scale/--set on purpose
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        cli_cls(cfg, known, args=rest)
    except (ValueError, NonFiniteLossError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
