"""Export to / import from a Hugging Face ``LlamaForCausalLM`` directory; load Lightning checkpoints.

Our weights map one to one onto HF Llama's except that q/k/v and gate/up are fused here
(``attn.wqkv``, ``mlp.w_gate_up``); they are split on export and concatenated on import. RoPE
uses the same "rotate half" layout as HF, so q/k rows need no permutation.

An exported directory holds ``config.json``, ``model.safetensors`` and the tokenizer files
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``) written by
``transformers.PreTrainedTokenizerFast``; ``AutoModelForCausalLM.from_pretrained(dir)`` and vLLM
load it and reproduce our logits. An export of a training checkpoint also holds
``megadoc_export.json``: the checkpoint's path, sha256, step and resolved recipe (what the
self-distillation rows cite as their teacher).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megadoc_pl.model.config import check_hf_matches, config_from_hf  # noqa: F401  (config_from_hf re-exported)
from megadoc_pl.model.llama import Llama, LlamaConfig
from megadoc_pl.utils import atomic_dir, json_fingerprint, sha256_file

PathLike = Union[str, os.PathLike]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPORT_PROVENANCE = "megadoc_export.json"  # in an export of a checkpoint: which checkpoint it holds


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
            raise ValueError(f"Hugging Face checkpoint has no tensor {name!r} (is it a LlamaForCausalLM?)")
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


def export_hf(model: Llama, out_dir: PathLike, tokenizer: Optional[PathLike] = None, dtype: str = "float32",
              overwrite: bool = False, provenance: Optional[dict] = None) -> Path:
    """Write a ``LlamaForCausalLM`` directory (built under a temporary name, renamed at the end);
    ``provenance`` (where the weights come from) is saved as ``megadoc_export.json``."""
    from safetensors.torch import save_file

    if dtype not in _DTYPES:
        raise ValueError(f"unknown export dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists (fix: choose another --out or pass --overwrite)")
    bos = eos = None
    tok = None
    if tokenizer is not None:
        from megadoc_pl.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"{tokenizer}: tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size}")
        bos, eos = tok.bos_id, tok.eos_id
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(to_hf_config(model.cfg, bos, eos, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": True}, indent=2) + "\n"
        )
        save_file(to_hf_state_dict(model, _DTYPES[dtype]), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tok is not None:
            _save_tokenizer(tok, tmp)
        if provenance is not None:
            (tmp / EXPORT_PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return out_dir


def _save_tokenizer(tok: Any, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    names = {}
    for key, tid in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        if tid is not None:
            names[key] = tok.tokenizer.id_to_token(tid)
    pad = tok.tokenizer.token_to_id("<pad>")
    if pad is not None:
        names["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, **names)
    fast.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# import


def _read_hf_dir(hf_dir: PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = Path(hf_dir)
    if not (d / "config.json").is_file():
        raise ValueError(f"{d}: no config.json (fix: pass a Hugging Face model directory saved with save_pretrained)")
    hf_cfg = json.loads((d / "config.json").read_text())
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{d}: no *.safetensors weights (fix: re-save the model with safe_serialization=True)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return hf_cfg, tensors


def load_hf(hf_dir: PathLike, **overrides) -> Llama:
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


# ---------------------------------------------------------------------------------------------
# Lightning checkpoints


def load_model_from_checkpoint(ckpt_path: PathLike, map_location: str = "cpu") -> tuple[Llama, dict]:
    """(Llama with the checkpoint's weights, resolved recipe dict) from a Lightning checkpoint.

    The LightningModule keeps the model as attribute ``model`` (state-dict keys ``model.*``,
    possibly ``model._orig_mod.*`` after torch.compile) and the recipe as ``hparams['cfg']``.
    """
    p = Path(ckpt_path)
    if p.is_dir():
        ckpt = _consolidate_sharded(p)
    elif not p.is_file():
        raise ValueError(f"{p}: no such checkpoint file")
    else:
        # Our own checkpoints hold plain dicts / OmegaConf containers, not only tensors.
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if cfg is None:
        raise ValueError(f"{p}: checkpoint has no hyper_parameters['cfg'] (was it written by megadoc_pl's trainer?)")
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    state = {}
    for key, value in ckpt["state_dict"].items():
        if key.startswith("model."):
            state[key[len("model."):].replace("_orig_mod.", "")] = value
    if "embed.weight" not in state:
        raise ValueError(f"{p}: state_dict has no 'model.embed.weight' (not a megadoc_pl Llama checkpoint)")
    model_cfg = LlamaConfig.from_recipe(cfg, vocab_size=state["embed.weight"].shape[0])
    with torch.device("meta"):
        model = Llama(model_cfg)
    model.load_state_dict(state, assign=True)
    model.rope.reset_parameters(state["embed.weight"].device)  # non-persistent buffer, was on 'meta'
    return model, cfg


def _consolidate_sharded(path: Path) -> dict:
    """A sharded (torch.distributed.checkpoint) Lightning checkpoint as one in-memory checkpoint dict."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (path / ".metadata").is_file() or not (path / "meta.pt").is_file():
        raise ValueError(f"{path}: a directory but not a sharded checkpoint (no .metadata / meta.pt)")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(full))
        state = torch.load(full, map_location="cpu", weights_only=False)
    meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
    return {**meta, "state_dict": state["state_dict"]}


def checkpoint_provenance(ckpt_path: PathLike, cfg: dict) -> dict:
    """Which training checkpoint this is: path, sha256 (a sharded checkpoint: of its files'
    hashes), global step and the resolved recipe ``cfg``."""
    p = Path(ckpt_path)
    if p.is_dir():
        meta = torch.load(p / "meta.pt", map_location="cpu", weights_only=False)
        sha = json_fingerprint({f.relative_to(p).as_posix(): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()})
    else:
        meta = torch.load(p, map_location="cpu", weights_only=False, mmap=True)  # only the step is read
        sha = sha256_file(p)
    return {"checkpoint": str(p.resolve()), "sha256": sha, "step": meta.get("global_step"),
            "recipe_sha256": json_fingerprint(cfg), "recipe": cfg}


def export_checkpoint(ckpt_path: PathLike, out_dir: PathLike, tokenizer: Optional[PathLike] = None,
                      dtype: str = "float32", overwrite: bool = False) -> Path:
    """Lightning checkpoint -> HF directory; the tokenizer defaults to the recipe's data.tokenizer."""
    model, cfg = load_model_from_checkpoint(ckpt_path)
    data = cfg.get("data") or {}
    tokenizer = tokenizer or data.get("tokenizer")
    if tokenizer is None and data.get("real") is None and cfg.get("demo"):
        # a demo run: its tokenizer is the demo's, which the recipe determines (cached, rebuilt if absent)
        from omegaconf import OmegaConf

        from megadoc_pl.demo import ensure_world

        tokenizer = ensure_world(OmegaConf.create(cfg))[1]
    if tokenizer is None:
        raise ValueError(
            f"{ckpt_path}: the recipe has no data.tokenizer (demo tokenizer?) (fix: pass --tokenizer PATH "
            "to the tokenizer.json used for training, or --no-tokenizer)"
        )
    return export_hf(model, out_dir, tokenizer=None if tokenizer == "none" else tokenizer, dtype=dtype, overwrite=overwrite,
                     provenance=checkpoint_provenance(ckpt_path, cfg))
