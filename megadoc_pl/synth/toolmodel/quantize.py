"""Quantized serving of the tool model: int8 on CPU (transformers), W8A8 for vLLM on GPU.

MAGA serves its tool models W8A8 (8-bit weights and activations) with SmoothQuant, which moves
activation outliers into the weights so that both quantize well.

- CPU / transformers: ``quantize_linears(model, "int8")`` swaps the weight of every
  ``nn.Linear`` for torchao's int8 tensor with dynamic per-token int8 activations
  (``Int8DynamicActivationInt8WeightConfig``). It needs no calibration and is applied when the
  transformers backend loads the model (``--backend-arg quantize=int8``). torch's own
  ``torch.ao.quantization.quantize_dynamic`` still runs on torch 2.13 but is deprecated for
  removal in favour of torchao, so torchao it is.
- GPU / vLLM: ``export_w8a8`` runs llm-compressor's one-shot recipe (SmoothQuant, then
  ``QuantizationModifier`` with the ``W8A8`` int8 scheme; or ``FP8_DYNAMIC`` for fp8 on
  Hopper) on calibration text taken from the SFT set, and saves a compressed-tensors checkpoint
  that ``vllm.LLM(model=OUT)`` (``--backend vllm --model OUT``) serves with its int8/fp8 kernels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from megadoc_pl.utils import require

CPU_SCHEMES = ("int8",)
W8A8_SCHEMES = {"int8": "W8A8", "fp8": "FP8_DYNAMIC"}  # ours -> compressed-tensors preset scheme


def _int8_data(weight) -> Any:
    """The int8 payload of a quantized weight (torchao's Int8Tensor or AffineQuantizedTensor), else None."""
    for path in ("qdata", "tensor_impl.int_data", "int_data"):
        obj = weight
        for name in path.split("."):
            obj = getattr(obj, name, None)
        if obj is not None:
            return obj
    return None


def count_quantized_linears(model) -> tuple[int, int]:
    """(Linear layers whose weight is stored as int8, all Linear layers)."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    int8 = [m for m in linears if getattr(_int8_data(m.weight), "dtype", None) == torch.int8]
    return len(int8), len(linears)


def quantize_linears(model, scheme: str = "int8") -> int:
    """Quantize every Linear layer of ``model`` in place for CPU/transformers serving; returns how many."""
    if scheme not in CPU_SCHEMES:
        raise ValueError(f"quantize={scheme!r}: the transformers backend knows {', '.join(CPU_SCHEMES)} "
                         "(fix: quantize=int8, or export W8A8 for vLLM with tools/toolmodel.py export-w8a8)")
    tq = require("torchao.quantization", "toolmodel", "int8 serving with the transformers backend")
    tq.quantize_(model, tq.Int8DynamicActivationInt8WeightConfig())
    done, total = count_quantized_linears(model)
    assert done == total, f"torchao left {total - done} of {total} Linear layers unquantized"
    return done


# ----------------------------------------------------------------------------- vLLM W8A8 export


def w8a8_recipe(scheme: str = "int8", smoothing_strength: float = 0.8) -> list[tuple[str, dict]]:
    """llm-compressor modifiers as (class name, keyword arguments): SmoothQuant for int8 (fp8's
    dynamic scales need no smoothing), then W8A8 on every Linear layer but the output head."""
    if scheme not in W8A8_SCHEMES:
        raise ValueError(f"--scheme {scheme!r}: choose from {', '.join(W8A8_SCHEMES)}")
    if not 0.0 < smoothing_strength < 1.0:
        raise ValueError(f"--smoothing-strength must be in (0, 1), got {smoothing_strength}")
    steps = [("SmoothQuantModifier", {"smoothing_strength": smoothing_strength})] if scheme == "int8" else []
    steps.append(("QuantizationModifier", {"targets": ["Linear"], "scheme": W8A8_SCHEMES[scheme], "ignore": ["lm_head"]}))
    return steps


def _llmcompressor_api():
    """(oneshot, {modifier name: class}) of the installed llm-compressor."""
    lc = require("llmcompressor", "w8a8", "the W8A8 export for vLLM")
    quant = require("llmcompressor.modifiers.quantization", "w8a8")
    try:  # SmoothQuant moved to modifiers.transform (0.10); the old path is a deprecated shim
        from llmcompressor.modifiers.transform import SmoothQuantModifier
    except ImportError:
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    return lc.oneshot, {"SmoothQuantModifier": SmoothQuantModifier, "QuantizationModifier": quant.QuantizationModifier}


def calibration_rows(tokenizer, examples: list[dict], num_samples: int, max_seq_len: int) -> list[dict]:
    """Tokenized prompt + completion of the first ``num_samples`` SFT examples (what the tool model
    sees when it serves), cut to ``max_seq_len`` tokens."""
    from megadoc_pl.synth.toolmodel.sft import encode_example

    rows = []
    for e in examples[:num_samples]:
        ids = encode_example(tokenizer, e["messages"], e["completion"])[0][:max_seq_len]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def export_w8a8(model_dir: str, out: str, calibration: str | None = None, scheme: str = "int8",
                num_samples: int = 512, max_seq_len: int = 4096, smoothing_strength: float = 0.8,
                api: tuple | None = None) -> dict:
    """Quantize the tool model in ``model_dir`` to a compressed-tensors W8A8 checkpoint in ``out``
    (GPU; vLLM serves it). ``calibration``: an sft.jsonl (needed for int8's SmoothQuant and
    activation ranges). ``api``: (oneshot, modifier classes), for tests; default llm-compressor."""
    import transformers

    from megadoc_pl.synth.backends.base import check_model_path
    from megadoc_pl.synth.toolmodel.dataset import load_examples
    from megadoc_pl.utils import atomic_write_json

    recipe_spec = w8a8_recipe(scheme, smoothing_strength)
    check_model_path(model_dir)
    if scheme == "int8" and calibration is None:
        raise ValueError("--scheme int8 needs --calibration sft.jsonl (SmoothQuant and the activation ranges "
                         "are measured on it)")
    oneshot, classes = api if api is not None else _llmcompressor_api()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    kwargs: dict[str, Any] = {"model": model, "tokenizer": tokenizer, "output_dir": str(out),
                              "recipe": [classes[name](**kw) for name, kw in recipe_spec]}
    if calibration is not None:
        import datasets

        rows = calibration_rows(tokenizer, load_examples(calibration), num_samples, max_seq_len)
        kwargs.update(dataset=datasets.Dataset.from_list(rows), num_calibration_samples=len(rows),
                      max_seq_length=max_seq_len)
    oneshot(**kwargs)  # saves the compressed model (and tokenizer) to output_dir
    tokenizer.save_pretrained(out)
    record_in = Path(model_dir) / "toolmodel.json"
    record = json.loads(record_in.read_text()) if record_in.is_file() else {}
    record["quantization"] = {"method": "llm-compressor oneshot", "recipe": recipe_spec,
                              "calibration": calibration, "num_samples": kwargs.get("num_calibration_samples", 0),
                              "max_seq_len": max_seq_len, "source_model": str(model_dir)}
    atomic_write_json(Path(out) / "toolmodel.json", record)
    if (Path(model_dir) / "generation_config.json").is_file() and not (Path(out) / "generation_config.json").exists():
        shutil.copy(Path(model_dir) / "generation_config.json", Path(out) / "generation_config.json")
    return record
