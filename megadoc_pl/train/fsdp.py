"""Sharded training for megadoc_pl runs.

- ``train.strategy=fsdp``: Lightning's FSDPStrategy (FSDP1) with the fixes a run needs.
- ``train.strategy=fsdp2``: per-parameter sharding (``fully_shard``) through Lightning's
  ModelParallelStrategy, the model built on the meta device and initialised shard by shard after
  sharding (``Llama.init_rowwise``: the same weights on any world size), bf16 parameters with fp32
  gradient reduction on GPU, activation checkpointing as an option. The path for 1.5B-13B.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import FSDPStrategy


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


def fsdp_strategy() -> MegadocFSDPStrategy:
    """Every transformer block wrapped; full state dicts in checkpoints."""
    from megadoc_pl.model.llama import Block

    # use_orig_params keeps parameter names (no-decay groups) and lets torch.compile see them
    return MegadocFSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True, state_dict_type="full")


def fsdp2_strategy(sharded_checkpoints: bool = False) -> Any:
    """ModelParallelStrategy with every rank data-parallel.

    Checkpoints are full state dicts gathered on rank 0, or with ``sharded_checkpoints`` a
    torch.distributed.checkpoint directory written by every rank: written under a temporary
    name and renamed into place (so ``last.ckpt`` is never half a checkpoint), and not written
    at all when a rank's shards hold NaN/inf (the previous checkpoint stays).
    """
    import contextlib

    from lightning.pytorch.strategies import ModelParallelStrategy

    from megadoc_pl.utils import atomic_dir

    class Fsdp2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            # the mesh is (world, 1): every rank shards the model for data parallelism ("auto" would be the node count)
            self._data_parallel_size = self.world_size
            super().setup_environment()

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
            if not self._save_distributed_checkpoint:
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            from pathlib import Path

            from megadoc_pl.utils import get_logger

            path = Path(self.broadcast(str(filepath)))
            finite = torch.tensor([int(_shards_finite(checkpoint.get("state_dict") or {}))], device=self.root_device)
            finite = self.reduce(finite, reduce_op="min")
            if int(finite.item()) == 0:
                get_logger("train").warning(f"not saving {path}: weights hold NaN/inf; the previous checkpoint stays")
                return
            with contextlib.ExitStack() as commit:  # rank 0 renames the directory into place on exit
                tmp = commit.enter_context(atomic_dir(path, overwrite=True)) if self.global_rank == 0 else None
                tmp = Path(self.broadcast(str(tmp) if tmp is not None else None))
                super().save_checkpoint(checkpoint, tmp, storage_options)
                self.barrier()
            self.barrier()

    return Fsdp2Strategy(tensor_parallel_size=1, save_distributed_checkpoint=sharded_checkpoints)


def _shards_finite(state: dict[str, Any]) -> bool:
    """Whether this rank's part of every floating-point tensor of a (sharded) state dict is finite."""
    for value in state.values():
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and not bool(torch.isfinite(local).all()):
            return False
    return True


def shard_and_materialise(model: torch.nn.Module, mesh: Any, device: torch.device, *, seed: int,
                          bf16_params: bool, activation_checkpointing: bool) -> None:
    """``fully_shard`` every Block and the root on ``mesh``, then allocate this rank's shards and initialise them.

    The model may live on the meta device (nothing allocated): only the shards are ever created.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 parameters, fp32 gradient reduction; block inputs are NOT cast to bf16 (FSDP2's default,
    # torchtitan's choice): the residual stream stays fp32 under autocast, as under DDP and FSDP1,
    # so a run's numbers do not depend on the strategy (docs/training.md, "Precision and strategies").
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16_params else MixedPrecisionPolicy()
    for block in model.layers:
        block.checkpoint = activation_checkpointing
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
        model.init_rowwise(seed)
