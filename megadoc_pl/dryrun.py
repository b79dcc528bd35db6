"""Dry runs: the plan of a recipe as JSON-able numbers, before any training.

``dry_run_report(prepared)`` is the plan of prepared data (tokens, passes, steps, parameters,
FLOPs and, on a GPU, hours); ``assumed_dry_run_report(cfg, sizes)`` is the same report from
assumed stream sizes, without preparing anything (no world, tokenizer or store).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.data.batch import packed_fields
from megadoc_pl.data.mixture import REAL, SYNTHETIC, MixturePlan
from megadoc_pl.data.prepare import PreparedData, plan_from_sizes, run_steps
from megadoc_pl.model.config import LlamaConfig
from megadoc_pl.model.flops import flops_per_token, peak_bf16_flops

ASSUMED_MFU = 0.40  # the MFU target (BENCHMARKS.md), used for the time estimate of a dry run


def plan_summary(cfg: DictConfig, plan: MixturePlan, vocab_size: int) -> dict:
    """The part of a dry-run report that the recipe and the stream sizes alone decide."""
    steps = run_steps(cfg, plan)
    return {
        "recipe": str(cfg.recipe), "scale": str(cfg.scale), "view": str(cfg.data.view),
        "generations": int(cfg.data.generations), "attention_scope": str(cfg.model.attention_scope),
        "plan": plan.to_dict(), "max_steps": steps,
        "trained_tokens": steps * plan.global_batch_size * plan.seq_len, "vocab_size": int(vocab_size),
    }


def prepared_summary(prepared: PreparedData) -> dict:
    """The dry-run plan of prepared data: streams, steps, windows, tokens, units, view statistics."""
    p = prepared
    out = plan_summary(p.cfg, p.plan, p.vocab_size)
    out.update({
        "fingerprint": p.fingerprint,
        "real": {"documents": p.real.num_documents, "heldout_documents": len(p.heldout), **p.real_units.stats},
        "validation": {k: {"documents": u.num_units, "tokens": u.num_tokens} for k, u in p.val_units.items()},
        "paths": {k: str(v) for k, v in p.paths.items()},
    })
    if p.synthetic_units is not None:
        out["synthetic"] = {"units": p.synthetic_units.num_units, "pieces": p.synthetic_units.num_pieces,
                            **p.synthetic_units.stats}
    return out


def dry_run_report(prepared: PreparedData, sample_windows: int = 64) -> dict:
    """The plan plus model size, training FLOPs and, on a GPU, the expected wall time."""

    def measured_keys() -> tuple[float, str]:
        # Mean keys per query under the recipe's scope, measured on training windows spread over
        # the first steps: every pass is a shuffle of the same units under the same mixture, and
        # windows spread over the whole run would shuffle a pass of units for each (paper-scale
        # rephrase: 30 passes of 5M units, 4 s).
        from megadoc_pl.model.flops import mean_attended_keys

        train = prepared.train_windows()
        span = min(len(train), 64 * sample_windows)
        idx = np.unique(np.linspace(0, span - 1, min(sample_windows, span)).astype(np.int64))
        cu = packed_fields(train.packed(idx, tensors=False))["cu_seqlens"]
        return mean_attended_keys(np.diff(cu)), f"measured on {len(idx)} of the first {span} training windows"

    return _add_model_and_cost(prepared.cfg, prepared_summary(prepared), prepared.vocab_size, measured_keys)


def assumed_dry_run_report(cfg: DictConfig, stream_tokens: Mapping[str, int]) -> dict:
    """The dry-run report of a validated recipe from assumed stream sizes (unique tokens per
    pass), reading no data.

    Nothing is prepared (no demo world, no tokenizer, no store): the vocabulary is
    ``model.vocab_size`` or the default of ``model.size``, and attention is costed over whole
    windows (exact for scope ``window``, an upper bound for ``document`` / ``megadoc``).
    """
    view = str(cfg.data.view)
    streams = [REAL, SYNTHETIC] if view != "real" else [REAL]
    unknown = sorted(set(stream_tokens) - {REAL, SYNTHETIC})
    if unknown:
        raise ValueError(f"assumed sizes name unknown stream(s) {unknown}; the streams are {REAL} and {SYNTHETIC}")
    if REAL not in stream_tokens:
        raise ValueError(f"recipe {cfg.recipe} needs the real stream's size (e.g. --assume-tokens {REAL}=200M)")
    if SYNTHETIC in streams and SYNTHETIC not in stream_tokens:
        raise ValueError(f"recipe {cfg.recipe} (data.view={view}) has a synthetic stream: give its size too "
                         f"(e.g. --assume-tokens {REAL}=200M,{SYNTHETIC}=3.7B)")
    if SYNTHETIC not in streams and SYNTHETIC in stream_tokens:
        raise ValueError(f"recipe {cfg.recipe} (data.view={view}) has no synthetic stream: drop {SYNTHETIC}= "
                         "from the assumed sizes")
    tokens = {n: int(stream_tokens[n]) for n in streams}
    fraction = float(cfg.data.real_fraction)
    if fraction < 1:  # the assumed size is the whole real corpus; the run trains on this share of it
        tokens[REAL] = int(tokens[REAL] * fraction)
    plan = plan_from_sizes(cfg, tokens)
    size = str(cfg.model.size)
    if cfg.model.vocab_size is not None:
        vocab, vocab_from = int(cfg.model.vocab_size), "model.vocab_size"
    else:
        vocab, vocab_from = LlamaConfig.from_name(size).vocab_size, f"default of model.size={size}"
    report = plan_summary(cfg, plan, vocab)
    for s in report["plan"]["streams"].values():
        s["units_per_pass"] = None  # unknown without the data
    report["assumed"] = {"stream_tokens": tokens, "real_fraction": fraction, "vocab_size": vocab_from,
                         "note": "stream sizes assumed: no data read, no units, validation sets or fingerprint"}
    T = int(cfg.data.seq_len)
    scope = str(cfg.model.attention_scope)
    how = "whole windows (exact for scope window)" if scope == "window" else (
        f"whole windows: an upper bound, scope {scope} cuts windows at boundaries an assumed-size run cannot see")
    return _add_model_and_cost(cfg, report, vocab, lambda: ((T + 1) / 2, how))


def _add_model_and_cost(cfg: DictConfig, report: dict, vocab_size: int,
                        mean_keys: Callable[[], tuple[float, str]]) -> dict:
    """Add parameters, training FLOPs and the hardware estimate to a plan summary (both dry runs)."""
    mcfg = LlamaConfig.from_recipe(OmegaConf.to_container(cfg, resolve=True), vocab_size)
    report["parameters"] = mcfg.num_params()
    report["parameters_non_embedding"] = mcfg.num_params(embeddings=False)
    keys, keys_from = mean_keys()
    per_token = flops_per_token(mcfg, int(cfg.data.seq_len), keys)
    total = per_token * report["trained_tokens"]
    report["flops"] = {"per_token": per_token, "total": total, "mean_attended_keys": round(keys, 2),
                       "mean_attended_keys_from": keys_from,
                       "six_N_D": 6 * report["parameters"] * report["trained_tokens"]}
    report["hardware"] = _time_estimate(cfg, total, peak_bf16_flops)
    report["memory_per_gpu"] = _memory(cfg, mcfg)
    return report


def _memory(cfg: DictConfig, mcfg: LlamaConfig) -> dict:
    """Per-device memory estimate for the recipe's strategy and world size; refuses a plan that cannot fit the GPU."""
    from megadoc_pl.model.memory import GIB, check_fits, memory_per_gpu

    t = cfg.train
    gpu = _cuda_device()
    devices = t.devices
    if devices in ("auto", -1, None):
        devices = gpu[2] if gpu else 1
    world = int(devices) * int(t.num_nodes)
    bf16 = "bf16" in str(t.precision) or (str(t.precision) == "auto" and gpu is not None)
    est = memory_per_gpu(mcfg, int(cfg.data.seq_len), int(t.micro_batch_size), str(t.strategy), world,
                         bool(t.activation_checkpointing), bf16=bf16)
    if gpu is not None:
        name, total, _ = gpu
        est["device"], est["device_gib"] = name, round(total / GIB, 1)
        check_fits(est, total / GIB, name)
    return est


def _cuda_device() -> Optional[tuple[str, int, int]]:
    """(name, bytes, count) of the first CUDA device, or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_name(0), int(torch.cuda.get_device_properties(0).total_memory), torch.cuda.device_count()
    except Exception:  # pragma: no cover - odd CUDA setups: no device check
        return None


def _time_estimate(cfg: DictConfig, total_flops: float, peak_fn) -> dict:
    if not any(Path(d).exists() for d in ("/dev/nvidiactl", "/dev/kfd")):  # no CUDA/ROCm driver: no torch import
        return {"device": "cpu", "estimated_hours": None, "note": "no GPU detected: no time estimate"}
    try:
        import torch

        if not torch.cuda.is_available():
            return {"device": "cpu", "estimated_hours": None, "note": "no GPU detected: no time estimate"}
        name = torch.cuda.get_device_name(0)
        devices = cfg.train.devices
        n = torch.cuda.device_count() if devices in ("auto", -1, None) else int(devices)
        n *= int(cfg.train.num_nodes)
    except Exception as e:  # pragma: no cover - odd CUDA setups
        return {"device": "unknown", "estimated_hours": None, "note": str(e)}
    peak = peak_fn(name)
    if peak is None:
        return {"device": name, "gpus": n, "estimated_hours": None, "note": "unknown peak FLOP/s (set MEGADOC_PEAK_FLOPS)"}
    hours = total_flops / (n * peak * ASSUMED_MFU) / 3600
    return {"device": name, "gpus": n, "peak_flops_per_gpu": peak, "assumed_mfu": ASSUMED_MFU,
            "estimated_hours": round(hours, 3)}


_SIZE_SUFFIXES = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_stream_sizes(text: str) -> dict[str, int]:
    """``'real=203867748,synthetic=3.7B'`` -> ``{'real': 203867748, 'synthetic': 3700000000}``.

    Counts are whole tokens; ``_`` separators and decimal k/M/B(G)/T suffixes are allowed.
    """
    from decimal import Decimal, InvalidOperation

    out: dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip().replace("_", "")
        if not sep or not name or not value:
            raise ValueError(f"{item.strip()!r} is not NAME=TOKENS (e.g. real=200M,synthetic=3.7B)")
        if name in out:
            raise ValueError(f"stream {name!r} is given twice")
        mult = _SIZE_SUFFIXES.get(value[-1].lower(), 1)
        number = value[:-1] if mult > 1 else value
        try:
            count = Decimal(number) * mult
        except InvalidOperation:
            raise ValueError(f"{name}={value}: not a token count (e.g. 203867748, 200M, 3.7B)") from None
        if not count.is_finite() or count < 0 or count != count.to_integral_value():
            raise ValueError(f"{name}={value}: a token count is a whole number >= 0")
        out[name] = int(count)
    return out
