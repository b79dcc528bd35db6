"""The self-distillation teacher: a megadoc_pl training checkpoint or its Hugging Face export.

``resolve_teacher`` turns ``--model`` into the directory a backend loads and the teacher's
provenance, which every ``self_distill`` row and ``.synth/run.json`` record:

- a Lightning checkpoint (``runs/NAME/checkpoints/last.ckpt``, or a sharded checkpoint
  directory) is exported with ``megadoc_pl/checkpoints.py`` into a scratch directory for the run;
- an export (``tools/export_hf.py``) is loaded as it is; its ``megadoc_export.json`` names the
  checkpoint it came from (path, sha256, step, recipe);
- any other Hugging Face directory is accepted with what it has: the weights' fingerprint, no
  checkpoint or step.
"""

from __future__ import annotations

import json
from pathlib import Path

from megadoc_pl.utils import json_fingerprint, sha256_file


def is_lightning_checkpoint(path: Path) -> bool:
    return (path.is_file() and path.suffix == ".ckpt") or (path.is_dir() and (path / "meta.pt").is_file())


def export_provenance(hf_dir: Path) -> dict:
    """What a HF directory's weights are: their sha256 and, for our exports, the checkpoint's record."""
    from megadoc_pl.checkpoints import EXPORT_PROVENANCE

    weights = sorted(hf_dir.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{hf_dir}: no *.safetensors weights (fix: export the checkpoint with tools/export_hf.py)")
    record = json.loads((hf_dir / EXPORT_PROVENANCE).read_text()) if (hf_dir / EXPORT_PROVENANCE).is_file() else {}
    return {"weights_sha256": json_fingerprint({f.name: sha256_file(f) for f in weights}),
            "checkpoint": record.get("checkpoint"), "sha256": record.get("sha256"), "step": record.get("step"),
            "recipe_sha256": record.get("recipe_sha256"), "recipe": record.get("recipe")}


def resolve_teacher(model: str, scratch: Path) -> tuple[str, dict]:
    """(directory to load, provenance) of ``--model``; a checkpoint is exported under ``scratch``."""
    path = Path(model).expanduser()
    if is_lightning_checkpoint(path):
        from megadoc_pl.checkpoints import export_checkpoint

        hf_dir = export_checkpoint(path, scratch / "teacher")
        return str(hf_dir), {"path": str(path.resolve()), **export_provenance(hf_dir)}
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), {"path": str(path.resolve()), **export_provenance(path)}
    raise ValueError(
        f"--task self_distill: --model {model} is neither a Lightning checkpoint (.ckpt, or a sharded checkpoint "
        "directory) nor a Hugging Face model directory (fix: pass runs/NAME/checkpoints/last.ckpt of the real-only "
        "teacher, or its export from tools/export_hf.py)"
    )


def row_teacher(provenance: dict) -> dict:
    """The teacher as each row cites it (run.json keeps the full record, recipe included)."""
    return {k: provenance.get(k) for k in ("path", "checkpoint", "sha256", "weights_sha256", "step", "recipe_sha256")}
