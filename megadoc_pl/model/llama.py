"""Llama-style decoder, top to bottom: config with named sizes, then the modules.

RMSNorm, RoPE, SwiGLU, grouped-query attention, untied embeddings, no biases, normal(0, 0.02)
init (docs/model.md). RoPE uses the "rotate half" layout of Hugging Face Llama, so exported q/k weights
need no permutation. Attention follows an ``AttentionMask`` built outside the forward
(model/attention.py); RoPE positions default to the mask's, which restart at every segment.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megadoc_pl.model.config import SIZES, LlamaConfig  # noqa: F401  (re-exported: the model's public names)
from megadoc_pl.model.attention import AttentionMask, attention, causal_mask, segment_mask
from megadoc_pl.model.loss import cross_entropy


# ---------------------------------------------------------------------------------------------
# model


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        if self.embed.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """normal(0, init_std) for every matrix, ones for norms (Levanter / HF Llama)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scale_residual_init else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)
        self.rope.reset_parameters()

    def init_rowwise(self, seed: int) -> None:
        """The same distribution as :meth:`reset_parameters`, drawn row by row from (seed, name, row).

        Every parameter sharded along dim 0 (FSDP2's ``Shard(0)``) gets the same values on any
        number of ranks, one process included, and a rank draws only its own rows: a model built on
        the meta device is materialised shard by shard, never whole.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scale_residual_init else std
        with torch.no_grad():
            for name, p in self.named_parameters():
                local, first_row = _local_rows(p)
                if p.dim() == 1:
                    local.fill_(1.0)
                    continue
                sigma = out_std if name.endswith(("attn.wo.weight", "mlp.w_down.weight")) else std
                block = torch.empty(local.shape, dtype=torch.float32)
                for i in range(local.shape[0]):
                    gen = torch.Generator().manual_seed(_row_seed(seed, name, first_row + i))
                    block[i].normal_(0.0, sigma, generator=gen)
                local.copy_(block)
        self.rope.reset_parameters(self.embed.weight.device if self.embed.weight.device.type != "meta" else None)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        mask: Optional[AttentionMask] = None,
    ) -> torch.Tensor:
        """Token ids (B, T) -> final-norm hidden states (B, T, D); attention follows ``mask``.

        ``mask`` comes from :meth:`segment_mask` (built before the forward, so a compiled forward
        never sees data-dependent host logic); without one every row is one causal sequence.
        ``positions`` (B, T) are RoPE positions, by default the mask's (restarting per segment).
        """
        B, T = input_ids.shape[:2]
        x_BTD = self.embed(input_ids)
        act_dtype = self._activation_dtype(x_BTD)
        if torch.is_autocast_enabled(x_BTD.device.type):  # the residual stream is fp32 under autocast, even
            x_BTD = x_BTD.float()  # where the parameters are bf16 (FSDP2's bf16 gather): as under DDP
        if mask is None:
            mask = causal_mask(self.cfg.attention_backend, B, T, x_BTD.device, act_dtype)
        elif mask.shape != (B, T):
            raise ValueError(f"the attention mask was built for (B, T) = {mask.shape}, the input is {(B, T)}")
        cos_BT1K, sin_BT1K = self.rope(mask.positions_BT if positions is None else positions, act_dtype)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_BT1K, sin_BT1K, mask)
        return self.norm(x_BTD)

    def segment_mask(self, segment_ids_BT: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                     max_seqlen: Optional[int] = None) -> AttentionMask:
        """The attention mask of a batch cut into segments, for this model's backend.

        Call it where the forward will run (same device, same autocast) and outside a compiled
        forward; ``cu_seqlens``/``max_seqlen`` from the batch spare the varlen backends a host sync.
        """
        weight = self.lm_head.weight  # where the forward runs, in the dtype it runs in without autocast
        seg_BT = segment_ids_BT.to(weight.device)
        dtype = self._activation_dtype(weight)
        return segment_mask(self.cfg.attention_backend, seg_BT, dtype, cu_seqlens, max_seqlen)

    @staticmethod
    def _activation_dtype(x: torch.Tensor) -> torch.dtype:
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

    def logits(self, hidden_BTD: torch.Tensor) -> torch.Tensor:
        """Full (B, T, V) logits: small vocabularies and evaluation only (see ``loss``)."""
        return self.lm_head(hidden_BTD)

    def loss(self, hidden_BTD: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean",
             ignore_index: int = -100) -> torch.Tensor:
        """Cross-entropy of the LM head over ``hidden`` without full logits, by ``cfg.loss_impl`` (model/loss.py)."""
        return cross_entropy(
            hidden_BTD, self.lm_head.weight, targets_BT, reduction=reduction, ignore_index=ignore_index,
            chunk_size=self.cfg.loss_chunk_size, impl=self.cfg.loss_impl,
        )


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_mlp)
        self.checkpoint = False  # recompute activations in backward (train.activation_checkpointing)

    def forward(self, x_BTD, cos_BT1K, sin_BT1K, mask) -> torch.Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x_BTD, cos_BT1K, sin_BT1K, mask, use_reentrant=False)
        return self._forward(x_BTD, cos_BT1K, sin_BT1K, mask)

    def _forward(self, x_BTD, cos_BT1K, sin_BT1K, mask) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos_BT1K, sin_BT1K, mask)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Attention(nn.Module):
    """Grouped-query attention; q, k and v come from one fused projection."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos_BT1K, sin_BT1K, mask) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, KV, K = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x_BTD).view(B, T, H + 2 * KV, K)
        qk_BTHK, v_BTHK = qkv.split([H + KV, KV], dim=2)
        q_BTHK, k_BTHK = apply_rope(qk_BTHK, cos_BT1K, sin_BT1K).split([H, KV], dim=2)  # q and k rotated at once
        y_BTHK = attention(q_BTHK, k_BTHK, v_BTHK, mask=mask)
        return self.wo(y_BTHK.reshape(B, T, H * K))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.d_mlp = d_mlp
        self.w_gate_up = nn.Linear(d_model, 2 * d_mlp, bias=False)  # [gate; up] fused
        self.w_down = nn.Linear(d_mlp, d_model, bias=False)

    def forward(self, x_BTD) -> torch.Tensor:
        gate, up = self.w_gate_up(x_BTD).split(self.d_mlp, dim=-1)
        return self.w_down(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 (as HF Llama does), scale in the input dtype.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight.to(x.dtype)


def _row_seed(seed: int, name: str, row: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _local_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of ``p``, index of the first) for a plain tensor or a DTensor sharded on dim 0."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.data, 0
    local = p.to_local()
    dims = [pl for pl in p.placements if isinstance(pl, Shard)]
    if not dims:
        return local, 0
    if len(p.placements) != 1 or dims[0].dim != 0:
        raise ValueError(f"init_rowwise supports one mesh dimension sharded on dim 0, got {p.placements}")
    chunk = -(-p.shape[0] // p.device_mesh.size())  # torch.chunk sizes, as FSDP2 shards
    first = p.device_mesh.get_local_rank() * chunk
    if local.shape[0] != max(0, min(chunk, p.shape[0] - first)):
        raise ValueError(f"unexpected shard of {tuple(p.shape)}: {tuple(local.shape)} rows from {first}")
    return local, first


class RotaryEmbedding(nn.Module):
    """cos/sin of position * inv_freq, for the "rotate half" pairing (i, i + head_dim / 2)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def reset_parameters(self, device: Optional[torch.device] = None) -> None:
        self.inv_freq = self._inv_freq().to(device or self.inv_freq.device)

    def forward(self, positions_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BTK = positions_BT.float()[..., None] * self.inv_freq.float()
        return angles_BTK.cos().to(dtype)[:, :, None], angles_BTK.sin().to(dtype)[:, :, None]


def apply_rope(x_BTHK: torch.Tensor, cos_BT1K: torch.Tensor, sin_BT1K: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BTHK.chunk(2, dim=-1)
    cos, sin = cos_BT1K.to(x_BTHK.dtype), sin_BT1K.to(x_BTHK.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
