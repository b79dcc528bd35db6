"""The run lifecycle: recipe -> data -> module -> Trainer -> fit -> metrics.json.

``megadoc-pl fit`` and ``recipes/train.py`` (both train/cli.py) call :func:`setup_run` and
:meth:`TrainingRun.fit`; ``train(cfg)`` is the same for Python callers (the tuner, tests).
The FSDP strategy lives in train/fsdp.py and the metrics.json record in train/metrics.py.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.data.datamodule import accumulation_steps
from megadoc_pl.errors import BadInput
from megadoc_pl.train import console, rundir
from megadoc_pl.train.callbacks import NonFiniteLossError, ThroughputMonitor
from megadoc_pl.train.checkpoint import NO_ROOM, CheckpointError, check_compatible, resume_from
from megadoc_pl.train.checkpoint_io import AtomicCheckpointIO
from megadoc_pl.train.metrics import run_metrics
from megadoc_pl.train.module import MegadocLM
from megadoc_pl.utils import get_logger

_log = get_logger("train")


@dataclass
class TrainingRun:
    """Everything one run is made of, built by :func:`setup_run`."""

    cfg: DictConfig  # resolved recipe (model.vocab_size and train.max_steps filled in)
    run_dir: Path
    datamodule: pl.LightningDataModule
    module: MegadocLM
    trainer: pl.Trainer
    ckpt_path: Optional[Path]  # checkpoint to resume from
    provenance: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    claim: Optional[rundir.RunClaim] = None  # rank 0's lock on run_dir (held until fit ends)

    # ------------------------------------------------------------------------------ fit

    def fit(self) -> Path:
        """Train (resuming if asked), validate at the end, save last.ckpt, write metrics.json.

        The checkpoint to resume from is checked first (content, weights, dataset fingerprint). A
        new run writes config.yaml and provenance.json at once; a resumed one when training starts
        (Lightning has restored the checkpoint by then), and its metrics.json only after that, so
        a refused resume leaves the run directory byte for byte as it was.
        """
        try:
            self._accept_checkpoint()
        except BaseException:
            self._release(remove_if_unused=True)
            raise
        files = _RunFiles(self)
        status, error = "failed", None
        set_env = rundir.RUN_DIR_ENV not in os.environ
        if set_env:  # ranks that Lightning launches later inherit the directory
            os.environ[rundir.RUN_DIR_ENV] = str(self.run_dir)
        thread_hook = threading.excepthook
        threading.excepthook = _main_thread_reports_full_disks(thread_hook)
        try:
            if self.trainer.is_global_zero:
                _log.info(_model_line(self.module.model.cfg, int(self.cfg.data.seq_len)))
            if self.ckpt_path is None:
                files.write(self.trainer)
            else:
                self.trainer.callbacks.append(files)
            self.trainer.fit(self.module, datamodule=self.datamodule,
                             ckpt_path=str(self.ckpt_path) if self.ckpt_path else None)
            if self.trainer.interrupted:
                status = "interrupted"
            elif self._nothing_trained():  # a requeue of a finished run: leave it exactly as it is
                status = "unchanged"
                _log.info(f"{self.run_dir} already finished at step {self.trainer.global_step}: nothing to train "
                          "(raise train.max_steps to extend it)")
            else:
                self._final_validation()
                self.trainer.save_checkpoint(self.run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT, weights_only=False)
                status = "finished"
        except NonFiniteLossError as e:
            status, error = "nonfinite_loss", str(e)
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            status, error = "interrupted", repr(e)
            raise
        except OSError as e:
            error = f"{type(e).__name__}: {e}"
            if e.errno not in NO_ROOM:
                raise
            raise CheckpointError(
                f"cannot write {e.filename or self.run_dir}: {e.strerror} (fix: free space on run.root's filesystem "
                "or make it writable, or set run.root to one that is; resume then continues from the last checkpoint)"
            ) from None
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            if set_env:
                os.environ.pop(rundir.RUN_DIR_ENV, None)
            if self.trainer.is_global_zero and status != "unchanged" and files.written:
                self._write_metrics(status, error)
            if files in self.trainer.callbacks:
                self.trainer.callbacks.remove(files)
            threading.excepthook = thread_hook
            self._release()
        return self.run_dir

    def _accept_checkpoint(self) -> None:
        """Resume from an intact checkpoint (for ``last``: else the newest intact ``step-*``) that fits this run."""
        if self.ckpt_path is None:
            return
        requested = Path(self.ckpt_path)
        last = self.run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT
        self.ckpt_path, ckpt = resume_from(requested, fallback=requested == last)
        check_compatible(ckpt, self.module, self.datamodule, self.ckpt_path)

    def _release(self, remove_if_unused: bool = False) -> None:
        if self.claim is not None:
            self.claim.release(remove_if_unused)

    def _nothing_trained(self) -> bool:
        restored = getattr(self.datamodule, "restored_step", None)
        return (self.ckpt_path is not None and restored is not None and restored == self.trainer.global_step
                and (self.run_dir / rundir.METRICS_FILE).is_file())

    def _write_metrics(self, status: str, error: Optional[str]) -> None:
        try:
            rundir.save_metrics(self.run_dir, self.metrics(status, error))
        except Exception as e:  # never hide the exception that ended the run
            if status == "finished":
                raise
            warnings.warn(f"could not write {self.run_dir / rundir.METRICS_FILE}: {e}")

    def validate(self, ckpt_path: Optional[str] = None) -> dict[str, float]:
        """Validate the module (or a checkpoint) on every named set; returns val/<name>/loss."""
        self.trainer.validate(self.module, datamodule=self.datamodule, ckpt_path=ckpt_path, verbose=False)
        return dict(self.module.last_val)

    def _final_validation(self) -> None:
        # the last in-loop validation may be some steps before the end
        if self.module.val_metrics is not None and self.module.last_val_step != self.trainer.global_step:
            self.trainer.validate(self.module, datamodule=self.datamodule, verbose=False)

    # ------------------------------------------------------------------------------ metrics.json

    def metrics(self, status: str, error: Optional[str] = None) -> dict[str, Any]:
        """The flat metrics.json object (docs/training.md, "metrics.json")."""
        return run_metrics(self.trainer, self.module, self.cfg, getattr(self.datamodule, "plan", None),
                           status=status, error=error, run_name=self.run_dir.name, provenance=self.provenance,
                           resumed_from=self.ckpt_path, started=self.started)


# ---------------------------------------------------------------------------------------------
# building a run


def _model_line(model_cfg: Any, seq_len: int) -> str:
    from megadoc_pl.model.flops import flops_per_token

    return console.model_line(model_cfg.num_params(), model_cfg.num_params(embeddings=False),
                              flops_per_token(model_cfg, seq_len))


def _main_thread_reports_full_disks(hook: Any) -> Any:
    """A ``threading.excepthook`` that leaves a full or read-only run directory to the main thread:
    TensorBoard's writer thread hits it first, prints a traceback, and re-raises it in the main
    thread, which turns it into the one-line error."""

    def quiet(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and args.exc_value.errno in NO_ROOM:
            return
        hook(args)

    return quiet


class _RunFiles(pl.Callback):
    """Writes config.yaml and provenance.json (rank 0) when training starts; ``written`` says it did."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.written = False

    def write(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            rundir.save_config(self.run.run_dir, self.run.cfg)
            rundir.save_provenance(self.run.run_dir, self.run.provenance)
            prepared = getattr(self.run.datamodule, "prepared", None)
            if prepared is not None:  # the resolved tokenizer, for export and evaluation (no demo rebuilt)
                rundir.save_tokenizer(self.run.run_dir, prepared.tokenizer.path)
        self.written = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.written:
            self.write(trainer)


def on_gpu(cfg: DictConfig) -> bool:
    return _on_gpu(str(cfg.train.accelerator))


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(cfg: DictConfig) -> str:
    """``auto``: bf16-mixed on GPU, 32-true on CPU; anything else is passed to Lightning."""
    return resolve_precision_name(str(cfg.train.precision), str(cfg.train.accelerator))


def resolve_precision_name(precision: str, accelerator: str) -> str:
    """:func:`resolve_precision` from the two recipe values (the CLI links ``trainer.precision`` through it)."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if _on_gpu(accelerator) else "32-true"


def build_strategy(cfg: DictConfig) -> Any:
    """``fsdp`` wraps every transformer block (train/fsdp.py); other names go to Lightning as they are."""
    name = str(cfg.train.strategy)
    if name == "fsdp":
        from megadoc_pl.train.fsdp import fsdp_strategy

        return fsdp_strategy()
    if name == "fsdp2":
        from megadoc_pl.train.fsdp import fsdp2_strategy

        return fsdp2_strategy(sharded_checkpoints=bool(cfg.train.sharded_checkpoints))
    return name


def trainer_kwargs(cfg: DictConfig, run_dir: Optional[Path] = None) -> dict[str, Any]:
    """Trainer arguments the recipe decides (the CLI shows these as its ``trainer.*`` defaults).

    Validation runs every ``data.val.interval`` optimizer steps, or once at the end (0). The
    interval is set on the Trainer by :func:`build_trainer`, in micro-batches, once the gradient
    accumulation is known.
    """
    t = cfg.train
    kw = {
        "accelerator": str(t.accelerator),
        "devices": t.devices,
        "num_nodes": int(t.num_nodes),
        "strategy": str(t.strategy),
        "precision": resolve_precision(cfg),
        "max_steps": int(t.max_steps) if t.max_steps is not None else -1,
        # max_steps ends the run; the datamodule's training loader runs to it. Unbounded epochs let a
        # resumed run extend past the step its checkpoint finished at (train.max_steps raised).
        "max_epochs": -1,
        "gradient_clip_val": float(t.grad_clip) if t.grad_clip else None,
        "log_every_n_steps": max(1, int(t.log_every)),
        # periodic checkpoints come from our ModelCheckpoint; the final one from TrainingRun.fit
        "enable_checkpointing": int(t.ckpt_every) > 0,
        "check_val_every_n_epoch": None,  # validation counted in steps, not epochs
        "num_sanity_val_steps": 0,
        # the datamodule shards windows by rank itself (window order is a pure function of the index)
        "use_distributed_sampler": False,
        # Lightning's table cannot trace a forward taking a batch dict (a FLOPs column of zeros);
        # TrainingRun.fit logs parameters and FLOPs per token in one line instead
        "enable_model_summary": False,
    }
    if str(t.strategy) == "fsdp2":
        # Lightning evaluates ModelParallelStrategy under torch.inference_mode on NCCL; FSDP2's first
        # unshard there fails ("Inference tensors do not track version counter"). no_grad instead.
        kw["inference_mode"] = False
    if run_dir is not None:
        kw["default_root_dir"] = str(run_dir)
    return kw


def build_trainer(cfg: DictConfig, run_dir: Path, datamodule: Any, overrides: Optional[Mapping[str, Any]] = None,
                  extra_callbacks: Optional[list] = None) -> pl.Trainer:
    """The Lightning Trainer for a run: recipe settings, then ``overrides`` (CLI / tests) on top."""
    overrides = dict(overrides or {})
    kw = trainer_kwargs(cfg, run_dir)
    kw.update({k: v for k, v in overrides.items() if k not in ("callbacks", "logger")})
    if kw["strategy"] in ("fsdp", "fsdp2"):
        kw["strategy"] = build_strategy(cfg)

    logger = overrides.get("logger", True)
    if logger is True or logger is None:
        # everything in the run directory itself: no lightning_logs/version_N folders
        logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    kw["logger"] = logger

    callbacks = list(extra_callbacks or []) + list(overrides.get("callbacks") or [])
    console.quiet_third_party()
    if kw.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        bar = console.step_progress_bar()
        if bar is not None:
            callbacks.append(bar)
    if int(cfg.train.ckpt_every) > 0:
        callbacks.append(ModelCheckpoint(
            dirpath=str(run_dir / rundir.CKPT_DIR), filename="step-{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(cfg.train.ckpt_every), save_top_k=-1, save_last=True,
            save_on_train_epoch_end=False, enable_version_counter=False,
        ))
    callbacks.append(_throughput_callback(cfg, kw))
    callbacks += _eval_callbacks(cfg, datamodule)
    kw["callbacks"] = callbacks
    if not any(isinstance(p, CheckpointIO) for p in kw.get("plugins") or []):
        kw["plugins"] = list(kw.get("plugins") or []) + [AtomicCheckpointIO()]
    if not getattr(datamodule, "val_set_names", None):
        kw.setdefault("limit_val_batches", 0)

    user_val_interval = kw.pop("val_check_interval", None)
    trainer = pl.Trainer(**kw)
    # The world size is only known once Lightning has resolved devices/nodes/launcher, so the two
    # settings that depend on it are set on the Trainer right after (both are plain attributes
    # read when fit starts).
    steps = step_settings(cfg, trainer.world_size)
    trainer.accumulate_grad_batches = steps["accumulate_grad_batches"]
    trainer.val_check_interval = user_val_interval or steps["val_check_interval"]
    return trainer


def step_settings(cfg: DictConfig, world_size: int) -> dict[str, int]:
    """``accumulate_grad_batches`` and ``val_check_interval`` of a Trainer of ``world_size`` ranks:
    validation every ``data.val.interval`` optimizer steps, or once at the end (0), in the
    micro-batches Lightning counts it in."""
    accum = accumulation_steps(int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size), int(world_size))
    interval = int(cfg.data.val.interval)
    return {"accumulate_grad_batches": accum,
            "val_check_interval": (interval if interval > 0 else int(cfg.train.max_steps)) * accum}


def _throughput_callback(cfg: DictConfig, kw: Mapping[str, Any]) -> ThroughputMonitor:
    """Throughput always; MFU against the GPU's bf16 peak when training in bf16 on a known GPU."""
    from megadoc_pl.model import flops
    from megadoc_pl.model.config import LlamaConfig

    model_cfg = LlamaConfig.from_recipe(OmegaConf.to_container(cfg, resolve=True))
    seq_len = int(cfg.data.seq_len)
    peak = None
    if on_gpu(cfg) and torch.cuda.is_available() and "bf16" in str(kw.get("precision", "")):
        peak = flops.peak_bf16_flops(torch.cuda.get_device_name())
    return ThroughputMonitor(
        int(cfg.train.global_batch_size) * seq_len,
        flops_fn=lambda mean_keys: flops.flops_per_token(model_cfg, seq_len, mean_keys),
        peak_flops_per_device=peak,
        window=max(10, int(cfg.train.log_every)),
    )


def _eval_callbacks(cfg: DictConfig, datamodule: Any) -> list:
    """Downstream multiple-choice evaluation when the recipe names tasks (eval.tasks)."""
    if not cfg.eval.tasks:
        return []
    from megadoc_pl.eval.callbacks import DownstreamEvalCallback

    tokenizer = getattr(getattr(datamodule, "prepared", None), "tokenizer", None)
    return [DownstreamEvalCallback.from_recipe(cfg, tokenizer=tokenizer)]


def prepare(cfg: DictConfig) -> tuple[DictConfig, pl.LightningDataModule]:
    """Data for a recipe (the built-in demo's without ``data.real``) and the config completed from
    it (vocab size, max steps)."""
    from megadoc_pl.data.prepare import prepare_data
    from megadoc_pl.demo import corpus_inputs

    dm = prepare_data(cfg, corpus_inputs(cfg))
    cfg = cfg.copy()
    if cfg.model.vocab_size is None:
        vocab = getattr(dm, "vocab_size", None)
        if vocab is None:
            raise ValueError("the datamodule does not report vocab_size; set model.vocab_size")
        cfg.model.vocab_size = int(vocab)
    plan = getattr(dm, "plan", None)
    if cfg.train.max_steps is None:
        if plan is None:
            raise ValueError("train.max_steps is not set and the data has no mixture plan to derive it from")
        cfg.train.max_steps = int(plan.steps)
    if int(cfg.train.max_steps) < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {cfg.train.max_steps}")
    return cfg, dm


def setup_run(cfg: DictConfig, trainer_overrides: Optional[Mapping[str, Any]] = None, stage: str = "fit") -> TrainingRun:
    """Resolve the run directory, data, module and Trainer of a recipe (nothing trained yet).

    ``stage='validate'`` looks at an existing run: no new directory check, config.yaml untouched.
    ``cfg`` is a validated recipe: the front doors run ``megadoc_pl.recipes.validate_recipe`` once,
    before this (no data is read and no directory made for a bad one). For ``fit``, global rank 0
    then claims the run directory (created and locked before any data work,
    :func:`rundir.claim_run_dir`); nothing is written into it until :meth:`TrainingRun.fit` has
    accepted the checkpoint to resume from.
    """
    from megadoc_pl.utils import global_rank

    if cfg.train.num_threads is not None:
        torch.set_num_threads(int(cfg.train.num_threads))
    run_dir = rundir.resolve_run_dir(cfg)
    ckpt = rundir.resume_checkpoint(cfg, run_dir) if stage == "fit" else None
    if stage == "fit" and ckpt is None and (run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT).exists():
        raise BadInput(
            f"{run_dir} already holds a trained run (fix: continue it with run.resume=last (--resume), "
            "or pick a new run.name)"
        )
    claim = None
    if stage == "fit" and global_rank() == 0:
        claim = rundir.claim_run_dir(run_dir, unique=rundir.is_generated_name(cfg))
        run_dir = claim.path
    try:
        return _build_run(cfg, run_dir, ckpt, claim, trainer_overrides)
    except BaseException:
        if claim is not None:
            claim.release(remove_if_unused=True)
        raise


def _build_run(cfg: DictConfig, run_dir: Path, ckpt: Optional[Path], claim: Optional[rundir.RunClaim],
               trainer_overrides: Optional[Mapping[str, Any]]) -> TrainingRun:
    cfg = cfg.copy()
    cfg.run.name = run_dir.name
    cfg.run.root = str(run_dir.parent)
    cfg, dm = prepare(cfg)
    console.quiet_third_party()
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)
    module = MegadocLM(OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(cfg, run_dir, dm, trainer_overrides)
    return TrainingRun(cfg=cfg, run_dir=run_dir, datamodule=dm, module=module, trainer=trainer,
                       ckpt_path=ckpt, provenance=rundir.provenance(cfg), claim=claim)


def train(cfg: DictConfig, trainer_overrides: Optional[Mapping[str, Any]] = None) -> Path:
    """Train a resolved, validated recipe; returns the run directory (config.yaml, events, checkpoints,
    metrics.json).

    ``trainer_overrides`` are extra ``lightning.Trainer`` arguments (e.g. ``enable_progress_bar``).
    """
    return setup_run(cfg, trainer_overrides).fit()
