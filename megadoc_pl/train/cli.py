"""``megadoc-pl``: the one command-line parser (Lightning's CLI) over the typed recipe.

::

    megadoc-pl fit --recipe megadoc_stitch --scale paper_300m --set data.real=real/ \\
        --set train.num_nodes=4 --set train.devices=8
    megadoc-pl fit --recipe megadoc_stitch --cfg.train.lr 3e-3 --trainer.enable_progress_bar false
    megadoc-pl fit --recipe megadoc_stitch --set run.name=stitch-a --resume         # continue last.ckpt
    megadoc-pl validate --recipe megadoc_stitch --set run.name=stitch-a --ckpt_path last
    megadoc-pl fit --recipe megadoc_stitch --print_config > stitch.yaml             # everything, resolved
    megadoc-pl fit --config stitch.yaml --set train.lr=0.5                          # ... and back
    megadoc-pl fit --help                                                           # every key, explained

The recipe is the typed argument ``cfg`` (:class:`megadoc_pl.config.RecipeConfig`; every key
is a ``--cfg.KEY`` flag whose help is the field's docstring). Precedence, lowest first:

1. the schema defaults of ``RecipeConfig``;
2. ``--recipe NAME`` (``recipes/methods/NAME.yaml`` or a YAML path), then its scale preset
   (``--scale NAME``, ``--set scale=NAME`` or the recipe's own);
3. ``--config FILE``, ``--cfg.KEY VALUE`` and ``--set KEY=VALUE`` (the same as
   ``--cfg.KEY=VALUE``), in command-line order: a later one wins, so
   ``--config run.yaml --set train.lr=0.5`` trains at 0.5.

The Trainer settings a recipe decides (accelerator, devices, num_nodes, strategy, precision,
max_steps, gradient clipping, logging interval) are *linked* from ``cfg.train``
(``link_arguments``): there is one value, the recipe's. ``--trainer.devices 4`` (and the other
linked names) is accepted as a spelling of ``--cfg.train.devices 4``; every other ``--trainer.*``
flag goes to the Trainer as it is. ``--recipe``, ``--scale``, ``--set`` and ``--resume`` are
read from the command line before the parser is built (they decide its defaults) and are also
parser arguments, so ``--help`` lists them.

``recipes/train.py --recipe NAME k=v ...`` is a front door to this same code path.
Exit codes: 0 done, 2 bad recipe / data / arguments (one line on stderr), 3 a non-finite loss.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

# Trainer argument -> the recipe key it is linked from (and an alias of on the command line).
TRAINER_LINKS = {
    "accelerator": "train.accelerator",
    "devices": "train.devices",
    "num_nodes": "train.num_nodes",
    "strategy": "train.strategy",
    "precision": "train.precision",
    "max_steps": "train.max_steps",
    "gradient_clip_val": "train.grad_clip",
    "log_every_n_steps": "train.log_every",
}
EXIT_BAD_INPUT, EXIT_NONFINITE = 2, 3


class CommandLine:
    """What is read from argv before the parser exists: the recipe, scale, ``--set`` items, --resume.

    ``rest`` is what the parser reads: ``--set KEY=VALUE`` becomes ``--cfg.KEY=VALUE`` and a
    linked ``--trainer.NAME V`` becomes ``--cfg.train.KEY=V``, each in its place.
    """

    def __init__(self, argv: Sequence[str]) -> None:
        self.recipe: Optional[str] = None
        self.scale: Optional[str] = None
        self.sets: list[str] = []
        self.resume = False
        self.rest: list[str] = []
        self.complete = True  # the recipe is --recipe/--scale/--set/linked --trainer.* flags alone
        argv = list(argv)
        i = 0

        def value_of(flag: str, eq: str, value: str) -> str:  # --flag=VALUE or --flag VALUE
            nonlocal i
            if eq:
                return value
            if i + 1 >= len(argv):
                raise ValueError(f"{flag} needs a value (see megadoc-pl fit --help)")
            i += 1
            return argv[i]

        while i < len(argv):
            arg = argv[i]
            flag, eq, value = arg.partition("=")
            linked = TRAINER_LINKS.get(flag[len("--trainer."):]) if flag.startswith("--trainer.") else None
            if flag in ("--recipe", "--scale"):
                setattr(self, flag[2:], value_of(flag, eq, value))
            elif flag == "--set":
                self._set(value_of(flag, eq, value))
            elif linked is not None:
                self._set(f"{linked}={value_of(flag, eq, value)}")
            elif flag == "--resume":
                self.resume = not eq or value.lower() in ("1", "true", "yes")
            else:
                if flag in ("--config", "-c") or flag.startswith("--cfg."):
                    self.complete = False  # the recipe is known only once the parser has read these
                self.rest.append(arg)
            i += 1
        if self.resume:
            self.rest.append("--cfg.run.resume=last")

    def _set(self, item: str) -> None:
        """``KEY=VALUE``: ``scale`` picks the preset; any other key is ``--cfg.KEY=VALUE`` in its place."""
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. --set train.lr=3e-3)")
        if key.strip() == "scale":
            self.scale = value.strip()
        else:
            self.sets.append(item)
            self.rest.append(f"--cfg.{key.strip()}={value}")

    def recipe_defaults(self) -> Any:
        """The composed recipe (method < scale < --set), the parser's default for ``cfg``."""
        from megadoc_pl.recipes import load_recipe

        sets = self.sets + ([f"scale={self.scale}"] if self.scale else [])
        return load_recipe(self.recipe or "baseline_real", sets + (["run.resume=last"] if self.resume else []))


def _link(parser: Any, key: str, target: str) -> None:
    from megadoc_pl.train.run import resolve_precision_name

    computes = {
        "precision": (("cfg.train.precision", "cfg.train.accelerator"), resolve_precision_name),
        "max_steps": (f"cfg.{key}", lambda v: -1 if v is None else int(v)),
        "gradient_clip_val": (f"cfg.{key}", lambda v: float(v) if v else None),
        "log_every_n_steps": (f"cfg.{key}", lambda v: max(1, int(v))),
    }
    source, fn = computes.get(target, (f"cfg.{key}", None))
    parser.link_arguments(source, f"trainer.{target}", compute_fn=fn)


def _build_cli_class():
    import jsonargparse
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.train import run as run_mod

    jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class OneLineErrorParser(LightningArgumentParser):
        """Bad arguments: one line and a hint instead of the whole usage."""

        def error(self, message: str, ex: Optional[Exception] = None) -> None:  # type: ignore[override]
            lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
            text = "; ".join(lines[:2]) if lines else "bad arguments"
            raise ValueError(f"{text} (see: {self.prog} --help)")

    class MegadocCLI(LightningCLI):
        """LightningCLI whose model and data come from the typed recipe ``cfg``."""

        def __init__(self, recipe_defaults: Any, command_line: CommandLine, args: list[str]) -> None:
            self.recipe_defaults = recipe_defaults
            self.command_line = command_line
            self.run: Optional[run_mod.TrainingRun] = None
            super().__init__(
                model_class=None, datamodule_class=None, save_config_callback=None,
                seed_everything_default=False, auto_configure_optimizers=False, load_from_checkpoint_support=False,
                parser_class=OneLineErrorParser,
                parser_kwargs={"description": "megadoc_pl training: a typed recipe (--cfg.*) and Lightning's Trainer"},
                args=args,
            )

        # --------------------------------------------------------------------- parser

        def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            parser.add_lightning_class_args(self.trainer_class, "trainer")

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            c = self.command_line
            parser.add_argument("--recipe", type=Optional[str], default=c.recipe,
                                help="method recipe name (recipes/methods/NAME.yaml) or a YAML path; sets the cfg defaults")
            parser.add_argument("--scale", type=Optional[str], default=c.scale,
                                help="scale preset name (recipes/scales/NAME.yaml)")
            parser.add_argument("--set", type=list[str], default=[],
                                help="recipe override KEY=VALUE, i.e. --cfg.KEY=VALUE in its place (repeat for several)")
            parser.add_argument("--resume", type=bool, default=c.resume,
                                help="continue the run's checkpoints/last.ckpt (cfg.run.resume=last)")
            parser.add_argument("--cfg", type=RecipeConfig, help="the recipe: every key, typed and documented")
            parser.set_defaults({"cfg": OmegaConf.to_container(self.recipe_defaults, resolve=True)})
            for target, key in TRAINER_LINKS.items():
                _link(parser, key, target)

        def _parse_ckpt_path(self) -> None:
            """Checkpoints carry the recipe in hparams['cfg']; nothing to merge into the CLI config."""

        # --------------------------------------------------------------------- instantiate

        def instantiate_classes(self) -> None:
            from lightning.pytorch import Trainer

            instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes  # jsonargparse >= 4.4x
            self.config_init = instantiate(self.config)
            section = self.config_init.get(str(self.subcommand), self.config_init)
            cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), OmegaConf.structured(section["cfg"]))
            defaults = {k: p.default for k, p in inspect.signature(Trainer.__init__).parameters.items()}
            overrides = {k: v for k, v in dict(section["trainer"]).items()
                         if k not in TRAINER_LINKS and k in defaults and v != defaults[k]}
            if not self.command_line.complete:  # else main() validated it, before Lightning was imported
                from megadoc_pl.recipes import validate_recipe

                validate_recipe(cfg)
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
                from megadoc_pl.train import rundir
                from megadoc_pl.train.console import metrics_table

                metrics = run_dir / rundir.METRICS_FILE
                if metrics.is_file():
                    print(metrics_table(json.loads(metrics.read_text())))
                print(f"run directory: {run_dir}")

        def validate(self, model: Any = None, datamodule: Any = None, ckpt_path: Optional[str] = None,
                     **_: Any) -> None:
            assert self.run is not None
            ckpt = _checkpoint(self.run, ckpt_path) if ckpt_path else None
            values = self.run.validate(str(ckpt) if ckpt else None)
            if self.trainer.is_global_zero:
                print(json.dumps(values, indent=2, sort_keys=True))

    return MegadocCLI


def _checkpoint(run: Any, ckpt_path: str) -> Path:
    from megadoc_pl.train import rundir

    if ckpt_path in ("last", "auto"):
        path = run.run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT
        if not path.exists():  # a file, or a directory of shards (train.sharded_checkpoints)
            raise ValueError(f"--ckpt_path {ckpt_path}: {path} does not exist (fix: give run.name of a trained run)")
        return path
    path = Path(ckpt_path)
    if not path.exists():
        raise ValueError(f"--ckpt_path {ckpt_path}: no such checkpoint file or sharded checkpoint directory "
                         "(fix: give 'last' or an existing path)")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``megadoc-pl``; returns the exit code (see the module docstring)."""
    import warnings

    from megadoc_pl.recipes import validate_recipe

    argv = list(sys.argv[1:] if argv is None else argv)
    # we hand LightningCLI the arguments left after reading --recipe/--scale/--set on purpose
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        command_line = CommandLine(argv)
        defaults = command_line.recipe_defaults()
        if command_line.complete:  # typos fail here, before Lightning is imported (else after parsing)
            validate_recipe(defaults)
        _build_cli_class()(defaults, command_line, args=command_line.rest)
    except ValueError as e:  # bad recipe, arguments, data or mixture: one line, no trace
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        from megadoc_pl.train.callbacks import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):  # a NaN/inf loss stops the run with its step and sources
            print(f"error: {e}", file=sys.stderr)
            return EXIT_NONFINITE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
