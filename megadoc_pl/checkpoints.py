"""Trained models from disk: one loader for every kind of path, and the Hugging Face export.

:func:`load_model` takes

- a Lightning checkpoint file written by the trainer (``runs/NAME/checkpoints/last.ckpt``): the
  model under the LightningModule attribute ``model`` (state-dict keys ``model.*``, or
  ``model._orig_mod.*`` after torch.compile) and the resolved recipe in
  ``hyper_parameters['cfg']``, which gives the architecture;
- a sharded checkpoint directory (``train.sharded_checkpoints``: torch.distributed.checkpoint
  shards beside Lightning's ``meta.pt``), consolidated in memory;
- a run directory: its ``checkpoints/last.ckpt`` (either kind);
- a Hugging Face Llama directory (``config.json`` + ``*.safetensors``, e.g. an export);

and returns a :class:`LoadedModel`: the Llama with what its callers need beside it (recipe,
tokenizer, step). A checkpoint's tokenizer is the copy its run directory keeps
(``tokenizer/``, written at training time by ``train/rundir.py``); for a run older than that, the
recipe's ``data.tokenizer`` when that path exists. Nothing here builds the demo.

:func:`export_checkpoint` writes a checkpoint as a ``LlamaForCausalLM`` directory
(:func:`export_hf`): ``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
written by ``transformers.PreTrainedTokenizerFast``) and ``megadoc_export.json``: the
checkpoint's path, sha256, step and resolved recipe (what the self-distillation rows cite as
their teacher). ``AutoModelForCausalLM.from_pretrained(dir)`` and vLLM load it and reproduce
our logits.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from megadoc_pl.errors import BadInput
from megadoc_pl.model import hf
from megadoc_pl.model.llama import Llama, LlamaConfig
from megadoc_pl.train.checkpoint import SHARDED_META
from megadoc_pl.train.rundir import CKPT_DIR, CONFIG_FILE, LAST_CKPT, TOKENIZER_DIR
from megadoc_pl.utils import atomic_dir, json_fingerprint, sha256_file

PathLike = Union[str, os.PathLike]
EXPORT_PROVENANCE = "megadoc_export.json"  # in an export of a checkpoint: which checkpoint it holds
_KINDS = "a .ckpt file, a sharded checkpoint or run directory, or a Hugging Face model directory"


@dataclass
class LoadedModel:
    """A trained Llama and what came with it."""

    model: Llama  # in eval mode, on the device and in the dtype asked for
    path: Path  # what was read: the checkpoint file or directory (a run's last.ckpt), or the HF directory
    recipe: Optional[dict]  # the checkpoint's resolved recipe (hyper_parameters['cfg']); None for an HF directory
    tokenizer: Optional[Path]  # the tokenizer it was trained with, where known (see the module docstring)
    step: Optional[int] = None  # the checkpoint's global step

    def require_tokenizer(self) -> Path:
        """The tokenizer, or a one-line error saying how to give it."""
        if self.tokenizer is not None:
            return self.tokenizer
        named = ((self.recipe or {}).get("data") or {}).get("tokenizer")
        why = (f"the recipe's data.tokenizer {named} does not exist" if named else
               f"its run directory keeps no {TOKENIZER_DIR}/ and the recipe names no data.tokenizer "
               "(a demo run from before runs kept their tokenizer)")
        raise BadInput(f"{self.path}: which tokenizer it was trained with is unknown: {why} "
                       "(fix: pass --tokenizer PATH, the tokenizer.json it was trained with)")


def load_model(path: PathLike, device: Any = "cpu", dtype: Optional[torch.dtype] = None) -> LoadedModel:
    """The Llama of a checkpoint file, sharded checkpoint, run directory or HF directory (see above)."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p}: no such model checkpoint or directory (fix: pass {_KINDS})")
    if p.is_dir() and not _is_sharded(p):
        if (p / CKPT_DIR / LAST_CKPT).exists():
            p = p / CKPT_DIR / LAST_CKPT
        elif (p / CONFIG_FILE).is_file():
            raise BadInput(f"{p}: a run directory without {CKPT_DIR}/{LAST_CKPT} (fix: pass one of its "
                           f"{CKPT_DIR}/step-*.ckpt, or resume the run to write {LAST_CKPT})")
        elif (p / "config.json").is_file():
            tokenizer = p if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file() else None
            return LoadedModel(hf.llama_from_hf(p).to(device=device, dtype=dtype).eval(), p, None, tokenizer)
        else:
            raise BadInput(f"{p}: neither a checkpoint, a run directory with {CKPT_DIR}/{LAST_CKPT}, nor a "
                           f"Hugging Face directory with config.json (fix: pass {_KINDS})")
    ckpt = _consolidate_sharded(p) if p.is_dir() else torch.load(p, map_location="cpu", weights_only=False)
    model, recipe = _llama_from_checkpoint(ckpt, p)
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), p, recipe, _checkpoint_tokenizer(p, recipe),
                       ckpt.get("global_step"))


def load_model_from_checkpoint(ckpt_path: PathLike, map_location: str = "cpu") -> tuple[Llama, dict]:
    """(Llama, resolved recipe) of a checkpoint: :func:`load_model` for the callers written before it."""
    loaded = load_model(ckpt_path, device=map_location)
    return loaded.model, loaded.recipe


def _is_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file() or (path / SHARDED_META).is_file()


def _llama_from_checkpoint(ckpt: dict, path: Path) -> tuple[Llama, dict]:
    """(Llama with the checkpoint's weights, resolved recipe dict) of a loaded Lightning checkpoint."""
    cfg = (ckpt.get("hyper_parameters") or {}).get("cfg")
    if cfg is None:
        raise BadInput(f"{path}: checkpoint has no hyper_parameters['cfg'] (fix: pass a checkpoint written by "
                       "megadoc_pl's trainer)")
    if not isinstance(cfg, dict):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    state = {}
    for key, value in ckpt["state_dict"].items():
        if key.startswith("model."):
            state[key[len("model."):].replace("_orig_mod.", "")] = value
    if "embed.weight" not in state:
        raise BadInput(f"{path}: state_dict has no 'model.embed.weight' (fix: pass a checkpoint of a megadoc_pl Llama)")
    model_cfg = LlamaConfig.from_recipe(cfg, vocab_size=state["embed.weight"].shape[0])
    with torch.device("meta"):
        model = Llama(model_cfg)
    model.load_state_dict(state, assign=True)
    model.rope.reset_parameters(state["embed.weight"].device)  # non-persistent buffer, was on 'meta'
    return model, cfg


def _consolidate_sharded(path: Path) -> dict:
    """A sharded (torch.distributed.checkpoint) Lightning checkpoint as one in-memory checkpoint dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (path / ".metadata").is_file() or not (path / SHARDED_META).is_file():
        raise BadInput(f"{path}: a directory but not a complete sharded checkpoint (no .metadata or {SHARDED_META}) "
                       "(fix: pass a checkpoint that finished writing, e.g. an earlier step-*.ckpt)")
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(str(path), str(full))
        state = torch.load(full, map_location="cpu", weights_only=False)
    meta = torch.load(path / SHARDED_META, map_location="cpu", weights_only=False)
    return {**meta, "state_dict": state["state_dict"]}


def _checkpoint_tokenizer(ckpt_path: Path, recipe: dict) -> Optional[Path]:
    """The copy the checkpoint's run keeps, else the recipe's data.tokenizer if it exists."""
    if ckpt_path.parent.name == CKPT_DIR:
        kept = ckpt_path.parent.parent / TOKENIZER_DIR
        if (kept / "tokenizer.json").is_file():
            return kept
    named = (recipe.get("data") or {}).get("tokenizer")
    return Path(named) if named and Path(named).exists() else None


# ---------------------------------------------------------------------------------------------
# export


def export_hf(model: Llama, out_dir: PathLike, tokenizer: Optional[PathLike] = None, dtype: str = "float32",
              overwrite: bool = False, provenance: Optional[dict] = None) -> Path:
    """Write a ``LlamaForCausalLM`` directory (built under a temporary name, renamed at the end);
    ``provenance`` (where the weights come from) is saved as ``megadoc_export.json``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise BadInput(f"{out_dir} already exists (fix: choose another --out or pass --overwrite)")
    tok = None
    if tokenizer is not None:
        from megadoc_pl.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
        if tok.vocab_size > model.cfg.vocab_size:
            raise BadInput(f"{tokenizer}: tokenizer has {tok.vocab_size} ids but the model only {model.cfg.vocab_size} "
                           "(fix: pass the tokenizer the model was trained with)")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        hf.save_hf(model, tmp, dtype, tok.bos_id if tok else None, tok.eos_id if tok else None)
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


def checkpoint_provenance(loaded: LoadedModel) -> dict:
    """Which training checkpoint this is: path, sha256 (a sharded checkpoint: of its files'
    hashes), global step and the resolved recipe."""
    p = loaded.path
    if p.is_dir():
        files = [f for f in sorted(p.rglob("*")) if f.is_file()]
        sha = json_fingerprint({f.relative_to(p).as_posix(): sha256_file(f) for f in files})
    else:
        sha = sha256_file(p)
    return {"checkpoint": str(p.resolve()), "sha256": sha, "step": loaded.step,
            "recipe_sha256": json_fingerprint(loaded.recipe), "recipe": loaded.recipe}


def export_checkpoint(path: PathLike, out_dir: PathLike, tokenizer: Optional[PathLike] = None,
                      dtype: str = "float32", overwrite: bool = False) -> Path:
    """A checkpoint (file, sharded directory or run directory) -> HF directory with its provenance.

    ``tokenizer``: a path, ``"none"`` for weights and config only, or None for the tokenizer the
    checkpoint was trained with (:meth:`LoadedModel.require_tokenizer`)."""
    loaded = load_model(path)
    if loaded.recipe is None:
        raise BadInput(f"{path}: a Hugging Face directory, not a training checkpoint (fix: use it as it is, "
                       "or pass the checkpoint it was exported from)")
    if tokenizer is None:
        tokenizer = loaded.require_tokenizer()
    return export_hf(loaded.model, out_dir, tokenizer=None if tokenizer == "none" else tokenizer, dtype=dtype,
                     overwrite=overwrite, provenance=checkpoint_provenance(loaded))
