"""Training FLOPs per token (attention included) and peak bf16 FLOP/s per GPU, for MFU.

Counting convention (one multiply-add = 2 FLOPs; backward = 2x forward, so training = 3x):

- weight matmuls: 6 * N_matmul per token, with N_matmul = every weight matrix of the blocks plus
  the LM head. The embedding lookup does no FLOPs; norms are negligible and not counted.
- attention scores and the weighted sum of values: per layer and token 4 * H * head_dim FLOPs
  per attended key in forward, so 12 * L * H * head_dim * C in training, where C is the mean
  number of keys a query attends to. Causal attention over one segment of n tokens attends
  n(n+1)/2 pairs; with document masking the segments are shorter, so C is computed from the
  batch's segment lengths rather than assumed to be the window length.

This counts the FLOPs the model really needs (PaLM's 6N + 12LHQT without causal discount
overstates attention by 2x, and by more under document masking), so MFU here is conservative.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from megadoc_pl.model.config import LlamaConfig  # not model.llama: a dry run imports no torch


def matmul_params(cfg: LlamaConfig) -> int:
    """Weights that take part in a matmul for every token: blocks' matrices + the LM head."""
    d, K = cfg.d_model, cfg.head_dim
    per_layer = d * (cfg.n_heads + 2 * cfg.n_kv_heads) * K + cfg.n_heads * K * d + 3 * d * cfg.d_mlp
    return cfg.n_layers * per_layer + cfg.vocab_size * d


def mean_attended_keys(segment_lengths: Iterable[int]) -> float:
    """Mean keys per query under causal attention restricted to segments of these lengths."""
    pairs = tokens = 0
    for n in segment_lengths:
        n = int(n)
        pairs += n * (n + 1) // 2
        tokens += n
    if tokens == 0:
        raise ValueError("no tokens in segment_lengths")
    return pairs / tokens


def flops_per_token(cfg: LlamaConfig, seq_len: int, mean_keys: Optional[float] = None, training: bool = True) -> float:
    """FLOPs per token of a training step (forward + backward) or of a forward pass only.

    ``mean_keys`` defaults to causal attention over whole windows, (seq_len + 1) / 2; pass
    ``mean_attended_keys(segment lengths)`` for document / megadoc scope.
    """
    keys = (seq_len + 1) / 2 if mean_keys is None else mean_keys
    forward = 2 * matmul_params(cfg) + 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * keys
    return 3 * forward if training else forward


# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, per GPU. First
# substring of torch.cuda.get_device_name() that matches wins, so more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756.0e12),
    ("H100 NVL", 835.0e12),
    ("H100", 989.4e12),  # SXM
    ("H800", 989.4e12),
    ("H20", 148.0e12),
    ("A100", 312.0e12),
    ("A800", 312.0e12),
    ("L40S", 362.05e12),
    ("L40", 181.05e12),
    ("L4", 121.0e12),
    ("A6000", 154.8e12),
    ("A10", 125.0e12),
    ("RTX 4090", 165.2e12),
    ("MI300X", 1307.4e12),
    ("MI250X", 383.0e12),
)


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """Peak dense bf16 FLOP/s of one GPU by name; env MEGADOC_PEAK_FLOPS overrides; None if unknown."""
    env = os.environ.get("MEGADOC_PEAK_FLOPS")
    if env:
        return float(env)
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None
