"""Hugging Face ``LlamaForCausalLM`` <-> our Llama: config, state dict, weights on disk.

Our weights map one to one onto HF Llama's except that q/k/v and gate/up are fused here
(``attn.wqkv``, ``mlp.w_gate_up``); they are split on export and concatenated on import. RoPE
uses the same "rotate half" layout as HF, so q/k rows need no permutation.

:func:`save_hf` writes ``config.json``, ``generation_config.json`` and ``model.safetensors``;
:func:`llama_from_hf` and :func:`load_hf_weights` read such a directory (ours or one saved by
``transformers``). This is the model layer: it imports nothing from the layers above it. The
export of a trained checkpoint (tokenizer files, provenance) and the loading of checkpoints are
``megadoc_pl/checkpoints.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megadoc_pl.errors import BadInput
from megadoc_pl.model.config import check_hf_matches, config_from_hf  # noqa: F401  (config_from_hf re-exported)
from megadoc_pl.model.llama import Llama, LlamaConfig

PathLike = Union[str, os.PathLike]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # of saved weights


# ---------------------------------------------------------------------------------------------
# names and shapes


def to_hf_state_dict(model: Llama, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our state dict in HF Llama names, fused projections split, each tensor contiguous."""
    cfg = model.cfg
    H, KV, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    src = model.state_dict()
    out = {
        "model.embed_tokens.weight": src["embed.weight"],
        "model.norm.weight": src["norm.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = src[ours + "attn.wqkv.weight"].split([H * K, KV * K, KV * K])
        gate, up = src[ours + "mlp.w_gate_up.weight"].split(cfg.d_mlp)
        out |= {
            hf + "self_attn.q_proj.weight": q,
            hf + "self_attn.k_proj.weight": k,
            hf + "self_attn.v_proj.weight": v,
            hf + "self_attn.o_proj.weight": src[ours + "attn.wo.weight"],
            hf + "mlp.gate_proj.weight": gate,
            hf + "mlp.up_proj.weight": up,
            hf + "mlp.down_proj.weight": src[ours + "mlp.w_down.weight"],
            hf + "input_layernorm.weight": src[ours + "attn_norm.weight"],
            hf + "post_attention_layernorm.weight": src[ours + "mlp_norm.weight"],
        }
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF Llama tensors -> our state dict (tied checkpoints: lm_head copied from the embedding)."""
    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise BadInput(f"Hugging Face checkpoint has no tensor {name!r} "
                           "(fix: pass the directory of a LlamaForCausalLM)")
        return hf[name]

    lm_head = hf.get("lm_head.weight", None)
    out = {
        "embed.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
        "lm_head.weight": get("model.embed_tokens.weight").clone() if lm_head is None else lm_head,
    }
    for i in range(cfg.n_layers):
        ours, p = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            ours + "attn.wqkv.weight": torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]),
            ours + "attn.wo.weight": get(p + "self_attn.o_proj.weight"),
            ours + "mlp.w_gate_up.weight": torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
            ours + "mlp.w_down.weight": get(p + "mlp.down_proj.weight"),
            ours + "attn_norm.weight": get(p + "input_layernorm.weight"),
            ours + "mlp_norm.weight": get(p + "post_attention_layernorm.weight"),
        }
    return out


def to_hf_config(cfg: LlamaConfig, bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """config.json contents for ``LlamaForCausalLM`` (current transformers and older readers)."""
    from transformers import LlamaConfig as HFLlamaConfig

    hf = HFLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
    ).to_dict()
    hf["architectures"] = ["LlamaForCausalLM"]
    hf["dtype"] = hf["torch_dtype"] = dtype  # 'torch_dtype' for transformers < 4.56 and vLLM
    hf["rope_theta"] = float(cfg.rope_theta)  # pre-'rope_parameters' readers
    return hf


# ---------------------------------------------------------------------------------------------
# export


def save_hf(model: Llama, out_dir: PathLike, dtype: str = "float32", bos_token_id: Optional[int] = None,
            eos_token_id: Optional[int] = None) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` into ``out_dir``."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise BadInput(f"unknown export dtype {dtype!r} (fix: choose one of {', '.join(DTYPES)})")
    out = Path(out_dir)
    config = to_hf_config(model.cfg, bos_token_id, eos_token_id, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "do_sample": True}, indent=2) + "\n"
    )
    save_file(to_hf_state_dict(model, DTYPES[dtype]), str(out / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# import


def _read_hf_dir(hf_dir: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise BadInput(f"{d}: no config.json (fix: pass a Hugging Face model directory saved with save_pretrained)")
    hf_cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise BadInput(f"{d}: no *.safetensors weights (fix: re-save the model with safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return hf_cfg, tensors


def llama_from_hf(hf_dir: PathLike, **overrides) -> Llama:
    """A new Llama with the architecture and weights of a HF Llama directory (fp32)."""
    hf_cfg, tensors = _read_hf_dir(hf_dir)
    model = Llama(config_from_hf(hf_cfg, **overrides))
    model.load_state_dict({k: v.float() for k, v in from_hf_state_dict(tensors, model.cfg).items()})
    return model


def load_hf_weights(model: Llama, hf_dir: PathLike) -> Llama:
    """Copy a HF Llama directory's weights into ``model`` (initial weights); the architecture must match."""
    hf_cfg, tensors = _read_hf_dir(hf_dir)
    check_hf_matches(model.cfg, hf_cfg, str(hf_dir))
    state = from_hf_state_dict(tensors, model.cfg)
    ref = model.state_dict()
    with torch.no_grad():
        model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})
    return model
