"""Memory per GPU of a training plan, from the model config alone (no torch): what ``--dry-run`` prints.

Bytes per device, for AdamW with fp32 master weights:

- weights 4N, gradients 4N, optimizer state 8N (exp_avg, exp_avg_sq): replicated under DDP,
  divided by the world size under FSDP / FSDP2 (plus, sharded, one all-gathered block in bf16,
  twice for prefetch);
- activations of one micro-batch, bf16, memory-efficient attention (no T x T scores): per block
  about ``T * b * (14 d + 4 d_kv + 8 d_mlp)`` bytes (norm outputs, q/k/v, attention output,
  residuals, SwiGLU's gate/up/product/down input); with activation checkpointing only each
  block's input (``2 T b d``) is kept, plus one block recomputed at a time;
- the chunked loss's logits for one chunk (fp32, and its gradient).

An estimate to plan with (allocator fragmentation, CUDA context and communication buffers are not
in it): the dry run refuses a plan only when the estimate alone exceeds the detected device.
"""

from __future__ import annotations

from typing import Any

from megadoc_pl.model.config import LlamaConfig

GIB = 1024 ** 3
SHARDED = ("fsdp", "fsdp2")


def memory_per_gpu(cfg: LlamaConfig, seq_len: int, micro_batch_size: int, strategy: str, world_size: int,
                   activation_checkpointing: bool = False, bf16: bool = True) -> dict[str, Any]:
    """Estimated bytes per device, by part, with the arithmetic they come from."""
    n = cfg.num_params()
    shards = world_size if strategy in SHARDED else 1
    d, f = cfg.d_model, cfg.d_mlp
    d_kv = cfg.n_kv_heads * cfg.head_dim
    act_bytes = 1 if bf16 else 2  # the per-block formula counts bf16 (2-byte) values; fp32 doubles it
    tokens = seq_len * micro_batch_size
    per_block = tokens * (14 * d + 4 * d_kv + 8 * f) * act_bytes
    if activation_checkpointing:
        activations = cfg.n_layers * 2 * tokens * d * act_bytes + per_block
        act_how = f"{cfg.n_layers} blocks x 2·T·b·d (checkpointed inputs) + one block recomputed"
    else:
        activations = cfg.n_layers * per_block
        act_how = f"{cfg.n_layers} blocks x T·b·(14d + 4d_kv + 8d_mlp)"
    block_params = 4 * d * d + 2 * d * d_kv + 3 * d * f  # q, o + k, v + gate, up, down (approx. per block)
    gathered = 2 * 2 * block_params if strategy in SHARDED else 0
    logits = 2 * 4 * min(cfg.loss_chunk_size, tokens) * cfg.vocab_size
    parts = {"weights": 4 * n / shards, "gradients": 4 * n / shards, "optimizer": 8 * n / shards,
             "gathered_block": gathered, "activations": activations, "logits_chunk": logits}
    total = sum(parts.values())
    return {
        "strategy": strategy, "world_size": world_size, "activation_checkpointing": activation_checkpointing,
        "gib": {k: round(v / GIB, 3) for k, v in parts.items()}, "total_gib": round(total / GIB, 3),
        "arithmetic": (f"weights+grads+adam = 16 B x {n:,} params / {shards} = {16 * n / shards / GIB:.2f} GiB; "
                       f"activations = {act_how} = {activations / GIB:.2f} GiB at T={seq_len}, b={micro_batch_size}"),
    }


def check_fits(estimate: dict[str, Any], device_gib: float, device_name: str) -> None:
    """One-line refusal of a plan whose estimate exceeds the device's memory."""
    if estimate["total_gib"] <= device_gib:
        return
    hints = ["more GPUs (train.num_nodes / train.devices)", "a smaller train.micro_batch_size"]
    if not estimate["activation_checkpointing"]:
        hints.append("train.activation_checkpointing=true")
    if estimate["strategy"] not in SHARDED:
        hints.append("train.strategy=fsdp2")
    raise ValueError(
        f"the plan needs about {estimate['total_gib']:.1f} GiB per GPU with {estimate['strategy']} on "
        f"{estimate['world_size']} GPU(s), more than the {device_gib:.0f} GiB of {device_name} (fix: {', or '.join(hints)})"
    )
