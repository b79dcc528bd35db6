"""One training run end to end: data -> module -> Trainer -> fit -> metrics.json.

``train(cfg)`` is what ``recipes/train.py`` calls; ``megadoc-pl fit`` (train/cli.py) uses the
same :func:`setup_run` / :meth:`TrainingRun.fit` with Trainer arguments from the command line.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.data.datamodule import accumulation_steps
from megadoc_pl.train import rundir
from megadoc_pl.train.callbacks import NonFiniteLossError, ThroughputMonitor
from megadoc_pl.train.module import MegadocLM


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

    # ------------------------------------------------------------------------------ fit

    def fit(self) -> Path:
        """Train (resuming if asked), validate at the end, save last.ckpt, write metrics.json."""
        status, error = "failed", None
        set_env = rundir.RUN_DIR_ENV not in os.environ
        if set_env:  # ranks that Lightning launches later inherit the directory
            os.environ[rundir.RUN_DIR_ENV] = str(self.run_dir)
        try:
            self.trainer.fit(self.module, datamodule=self.datamodule,
                             ckpt_path=str(self.ckpt_path) if self.ckpt_path else None)
            if self.trainer.interrupted:
                status = "interrupted"
            else:
                self._final_validation()
                self.trainer.save_checkpoint(self.run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT)
                status = "finished"
        except NonFiniteLossError as e:
            status, error = "nonfinite_loss", str(e)
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            status, error = "interrupted", repr(e)
            raise
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            if set_env:
                os.environ.pop(rundir.RUN_DIR_ENV, None)
            if self.trainer.is_global_zero:
                self._write_metrics(status, error)
        return self.run_dir

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
        """The flat metrics.json object (SPEC 3.5)."""
        m = self.module
        out: dict[str, Any] = {}
        for k, v in self.trainer.callback_metrics.items():  # downstream/*, grad norm, ...
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                out[k] = float(v)
        out.update({k: float(v) for k, v in m.last_train.items()})
        for cb in self.trainer.callbacks:
            if isinstance(cb, ThroughputMonitor):
                out.update(cb.last)
            # downstream scores survive the post-fit validate(), which clears callback_metrics
            out.update({k: float(v) for k, v in (getattr(cb, "last_metrics", None) or {}).items()})
        out.update(m.last_val)
        for k, v in m.best_val.items():
            out[f"{k}_best"] = v
        if m.counter is not None:
            out.update(m.counter.metrics())
            out["tokens_seen"] = int(m.counter.tokens.sum())
        else:
            out["tokens_seen"] = int(self.trainer.global_step * self.cfg.train.global_batch_size * self.cfg.data.seq_len)
        plan = getattr(self.datamodule, "plan", None)
        if plan is not None:
            out["plan/steps"] = int(plan.steps)
            out["plan/tokens"] = int(plan.tokens)
        out.update({
            "status": status,
            "error": error,
            "run_name": self.run_dir.name,
            "recipe": self.cfg.recipe,
            "scale": self.cfg.scale,
            "steps": int(self.trainer.global_step),
            "max_steps": int(self.cfg.train.max_steps),
            # from the config: under FSDP the module's own parameters are this rank's shards
            "parameters": int(m.model.cfg.num_params()),
            "parameters_non_embedding": int(m.model.cfg.num_params(embeddings=False)),
            "global_batch_size": int(self.cfg.train.global_batch_size),
            "micro_batch_size": int(self.cfg.train.micro_batch_size),
            "accumulate_grad_batches": int(self.trainer.accumulate_grad_batches),
            "world_size": int(self.trainer.world_size),
            "seq_len": int(self.cfg.data.seq_len),
            "precision": str(self.trainer.precision),
            "resumed_from": str(self.ckpt_path) if self.ckpt_path else None,
            "wall_time_s": round(m.train_time_s(), 3),
            "total_time_s": round(time.time() - self.started, 3),
        })
        out.update(rundir.flat_provenance(self.provenance))
        return out


# ---------------------------------------------------------------------------------------------
# building a run


class MegadocFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with the fixes a megadoc_pl run needs (``train.strategy=fsdp``).

    - Validation after fit (``TrainingRun._final_validation``) reuses the root FSDP wrapper.
      Lightning wraps the LightningModule again, finds the Blocks already wrapped, skips the root
      and leaves the root's parameters (embeddings, final norm, head) as this rank's flat shards:
      "'weight' must be 2-D" (Lightning issue #19015).
    - Mixed precision keeps buffers in fp32. Lightning's FSDP bf16-mixed casts buffers to bf16,
      which rounds RoPE's ``inv_freq`` (0.3162 -> 0.3164): the run would train with other rotary
      frequencies than DDP, evaluation and the exported model use.
    - It runs on the CPU over gloo (tests, debugging). torch's FSDP supports CPU tensors given
      ``device_id=cpu``; Lightning passes ``root_device.index`` (None on the CPU, so torch looks
      for an accelerator), gathers full state dicts with ``offload_to_cpu=True`` (wrong on the CPU,
      see :meth:`_full_state_dict_context`), and refuses ``accelerator='cpu'`` for the name
      ``fsdp`` or the exact type ``FSDPStrategy`` (a subclass passes).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._root: Optional[torch.nn.Module] = None

    @property
    def mixed_precision_config(self) -> Any:
        config = super().mixed_precision_config
        if config is not None and "mixed" in str(self.precision_plugin.precision) and config.buffer_dtype is not None:
            config = dataclasses.replace(config, buffer_dtype=torch.float32)
        return config

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._root is not None and self._root.module is model:
            return self._root
        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # else Lightning warns that it ignores the policy
        self._root = super()._setup_model(model)
        return self._root

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._full_on_cpu():
            return super().lightning_module_state_dict()
        with self._full_state_dict_context():
            return self.model.state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self._full_on_cpu():
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import OptimStateKeyType

        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        with self._full_state_dict_context():
            state = FSDP.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # keyed by parameter index, as Lightning stores it
                state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state

    def _full_on_cpu(self) -> bool:
        return self._state_dict_type == "full" and self.root_device.type == "cpu"

    def _full_state_dict_context(self) -> Any:
        """Full state dicts on rank 0 without ``offload_to_cpu``: on the CPU that option makes
        torch skip its copies, so gathered weights point into freed memory (segfault) and each
        Adam ``exp_avg`` into the buffer reused for ``exp_avg_sq`` (a silently wrong resume)."""
        from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                    FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                    FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))


def on_gpu(cfg: DictConfig) -> bool:
    acc = str(cfg.train.accelerator)
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def resolve_precision(cfg: DictConfig) -> str:
    """``auto``: bf16-mixed on GPU, 32-true on CPU; anything else is passed to Lightning."""
    p = str(cfg.train.precision)
    if p != "auto":
        return p
    return "bf16-mixed" if on_gpu(cfg) else "32-true"


def build_strategy(cfg: DictConfig) -> Any:
    """``fsdp`` wraps every transformer block; other names go to Lightning as they are."""
    name = str(cfg.train.strategy)
    if name == "fsdp":
        from megadoc_pl.model.llama import Block

        # use_orig_params keeps parameter names (no-decay groups) and lets torch.compile see them
        return MegadocFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, state_dict_type="full")
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
        "max_epochs": 1,  # the datamodule's training loader is the whole run
        "gradient_clip_val": float(t.grad_clip) if t.grad_clip else None,
        "log_every_n_steps": max(1, int(t.log_every)),
        # periodic checkpoints come from our ModelCheckpoint; the final one from TrainingRun.fit
        "enable_checkpointing": int(t.ckpt_every) > 0,
        "check_val_every_n_epoch": None,  # validation counted in steps, not epochs
        "num_sanity_val_steps": 0,
        # the datamodule shards windows by rank itself (window order is a pure function of the index)
        "use_distributed_sampler": False,
    }
    if run_dir is not None:
        kw["default_root_dir"] = str(run_dir)
    return kw


def build_trainer(cfg: DictConfig, run_dir: Path, datamodule: Any, overrides: Optional[Mapping[str, Any]] = None,
                  extra_callbacks: Optional[list] = None) -> pl.Trainer:
    """The Lightning Trainer for a run: recipe settings, then ``overrides`` (CLI / tests) on top."""
    overrides = dict(overrides or {})
    kw = trainer_kwargs(cfg, run_dir)
    kw.update({k: v for k, v in overrides.items() if k not in ("callbacks", "logger")})
    if kw["strategy"] == "fsdp":
        kw["strategy"] = build_strategy(cfg)

    logger = overrides.get("logger", True)
    if logger is True or logger is None:
        # everything in the run directory itself: no lightning_logs/version_N folders
        logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    kw["logger"] = logger

    callbacks = list(extra_callbacks or []) + list(overrides.get("callbacks") or [])
    if int(cfg.train.ckpt_every) > 0:
        callbacks.append(ModelCheckpoint(
            dirpath=str(run_dir / rundir.CKPT_DIR), filename="step-{step:06d}", auto_insert_metric_name=False,
            every_n_train_steps=int(cfg.train.ckpt_every), save_top_k=-1, save_last=True,
            save_on_train_epoch_end=False, enable_version_counter=False,
        ))
    callbacks.append(_throughput_callback(cfg, kw))
    callbacks += _eval_callbacks(cfg, datamodule)
    kw["callbacks"] = callbacks
    if not getattr(datamodule, "val_set_names", None):
        kw.setdefault("limit_val_batches", 0)

    user_val_interval = kw.pop("val_check_interval", None)
    trainer = pl.Trainer(**kw)
    # The world size is only known once Lightning has resolved devices/nodes/launcher, so the two
    # settings that depend on it are set on the Trainer right after (both are plain attributes
    # read when fit starts).
    accum = accumulation_steps(int(cfg.train.global_batch_size), int(cfg.train.micro_batch_size), trainer.world_size)
    trainer.accumulate_grad_batches = accum
    interval = int(cfg.data.val.interval)
    # Lightning counts validation intervals in (micro-)batches, we count optimizer steps
    trainer.val_check_interval = user_val_interval or (interval if interval > 0 else int(cfg.train.max_steps)) * accum
    return trainer


def _throughput_callback(cfg: DictConfig, kw: Mapping[str, Any]) -> ThroughputMonitor:
    """Throughput always; MFU against the GPU's bf16 peak when training in bf16 on a known GPU."""
    from megadoc_pl.model import flops
    from megadoc_pl.model.hf import config_from_recipe

    model_cfg = config_from_recipe(OmegaConf.to_container(cfg.model, resolve=True))
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
    """Data for a recipe and the config completed from it (vocab size, max steps)."""
    from megadoc_pl.pipeline import prepare_data

    dm = prepare_data(cfg)
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
    """
    run_dir = rundir.resolve_run_dir(cfg)
    ckpt = rundir.resume_checkpoint(cfg, run_dir) if stage == "fit" else None
    if stage == "fit" and ckpt is None and (run_dir / rundir.CKPT_DIR / rundir.LAST_CKPT).exists():
        raise SystemExit(
            f"error: {run_dir} already holds a trained run; continue it with run.resume=last (--resume), "
            "or pick a new run.name"
        )
    cfg = cfg.copy()
    cfg.run.name = run_dir.name
    cfg.run.root = str(run_dir.parent)
    cfg, dm = prepare(cfg)
    # reading window indices before the device transfer is deliberate (no GPU sync per batch)
    warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer`.*")
    # validation losses are logged already summed over ranks (eval.validation), no sync_dist needed
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    pl.seed_everything(int(cfg.train.seed), workers=True, verbose=False)
    module = MegadocLM(OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(cfg, run_dir, dm, trainer_overrides)
    info = rundir.provenance(cfg)
    if trainer.is_global_zero and stage == "fit":
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.save_config(run_dir, cfg)
        rundir.save_provenance(run_dir, info)
    return TrainingRun(cfg=cfg, run_dir=run_dir, datamodule=dm, module=module, trainer=trainer,
                       ckpt_path=ckpt, provenance=info)


def train(cfg: DictConfig, trainer_overrides: Optional[Mapping[str, Any]] = None) -> Path:
    """Train a resolved recipe; returns the run directory (config.yaml, events, checkpoints, metrics.json).

    ``trainer_overrides`` are extra ``lightning.Trainer`` arguments (e.g. ``enable_progress_bar``).
    """
    return setup_run(cfg, trainer_overrides).fit()
