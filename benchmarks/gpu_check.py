#!/usr/bin/env python
"""The steps of the GPU check, one subcommand each; ``scripts/gpu_check.sh`` runs them in order.

    python3 benchmarks/gpu_check.py versions     # GPU, library versions, what attention 'auto' picks
    python3 benchmarks/gpu_check.py attention    # each backend in bf16 against fp32 sdpa, forward + backward
    python3 benchmarks/gpu_check.py model_init   # 300m loss and gradients at init: fp32 sdpa vs bf16 per backend
    python3 benchmarks/gpu_check.py recompiles   # compiled model: recompiles over new segmentations
    python3 benchmarks/gpu_check.py throughput   # bench_train_step.py per backend, eager and compiled; dry-run memory
    python3 benchmarks/gpu_check.py profiler     # top CUDA ops of one 300m / 4096 training step, the loss's share
    python3 benchmarks/gpu_check.py prep         # prepare the demo data (the script runs it in the background)
    python3 benchmarks/gpu_check.py demo_fits    # demo fits in fp32 and bf16-mixed, final losses compared
    python3 benchmarks/gpu_check.py fsdp2        # an fsdp2 fit (activation checkpointing, sharded checkpoints), validate
    python3 benchmarks/gpu_check.py loader       # bench_views.py: 0-16 workers vs nanoGPT's get_batch, GPU unpack
    python3 benchmarks/gpu_check.py summary OUT LOGS   # OUT/summary.md and OUT/logs.txt from OUT/steps.tsv
    python3 benchmarks/gpu_check.py wheels       # the pinned wheels `make gpu-bundle` downloads
    python3 benchmarks/gpu_check.py bundle DIR   # check a bundle: one wheel per pin, total size under 64 MiB

Every step prints ``RESULT:`` lines as it goes; they make the step's cell in the summary, so a
step cut off by its time limit still reports what it finished. A step exits 1 when a check
fails. ``GPU_CHECK_SMOKE=1`` runs the same code at toy sizes on the CPU (the parts that need
CUDA print "skipped: no GPU"). Runs, caches and benchmark data go under ``GPU_CHECK_WORK``
(default /tmp/gpu_check_work); ``GPU_CHECK_STEP_END`` (epoch seconds, set by the script) is when
the step's time runs out: sub-runs get what is left. See docs/gpu-check.md.

``summary``, ``wheels`` and ``bundle`` need only the standard library.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RECIPE = "megadoc_stitch"

# Wheels the lent GPU machine lacks (it has torch, lightning, transformers, tokenizers, torchmetrics,
# tensorboard, numpy, pyarrow, scipy, matplotlib, safetensors, tqdm, pyyaml, triton), pinned to the
# versions the CPU tests run with where those have cp312 wheels. `make gpu-bundle` downloads them
# (cp312, manylinux x86_64, --no-deps). flash-attn is left out: hundreds of MB, tied to one torch/CUDA build.
WHEELS = {
    "omegaconf": "2.4.0",  # vendors its antlr4 runtime (2.3 needed antlr4-python3-runtime 4.9.3, an sdist)
    "jsonargparse": "4.53.0",  # the CLI (LightningCLI)
    "docstring-parser": "0.18.0",  # jsonargparse[signatures]
    "typeshed-client": "2.15.0",  # jsonargparse[signatures]; needs typing-extensions, which torch brings
    "orjson": "3.13.0",
    "zstandard": "0.25.0",
    "liger-kernel": "0.8.5",  # model.loss_impl=liger: pure Python + Triton, needs only torch and triton
}
BUNDLE_LIMIT = 64 * 2**20  # what travels with the working tree to the GPU machine


@dataclass(frozen=True)
class Sizes:
    """What the steps run at: the real check on a GPU, or the CPU smoke run."""

    model: str  # named model size of model_init, recompiles (2 of its layers), throughput, profiler
    batch: int  # B of the attention, model_init and recompile batches
    seq: int  # T of every model step
    heads: tuple[tuple[int, int], ...]  # (query heads, key/value heads) of the attention configs
    head_dims: tuple[int, ...]  # head dims of the attention configs
    mean_doc: int  # mean document length (exponential lengths, plus forced length-1 segments)
    iters: int  # timed iterations per attention backend
    bench_batch: int  # B of throughput and profiler (paper_300m's micro-batch)
    bench_args: tuple[str, ...]  # bench_train_step.py --gpu arguments
    fit_steps: int  # each demo fit
    fsdp_steps: int  # the fsdp2 fit
    workers: str  # loader worker counts
    loader_args: tuple[str, ...]  # bench_views.py arguments
    recipe_sets: tuple[str, ...]  # demo recipe overrides of the fits
    dry_run_sets: tuple[str, ...]  # the recipe whose dry run gives throughput's memory estimate


GPU = Sizes(
    model="300m", batch=2, seq=4096, heads=((16, 16), (16, 8)), head_dims=(64, 128), mean_doc=512, iters=5,
    bench_batch=8, bench_args=("--gpu-size", "300m", "--gpu-seq", "4096", "--batch", "8", "--steps", "10",
                               "--warmup", "3", "--loss-chunk", "4096"),
    fit_steps=60, fsdp_steps=30, workers="0,2,4,8,16", loader_args=("--sources", "4000"),
    recipe_sets=(),
    dry_run_sets=("scale=paper_300m", "train.micro_batch_size=8", "model.loss_chunk_size=4096"),
)
SMOKE = Sizes(
    model="nano", batch=2, seq=128, heads=((4, 4), (4, 2)), head_dims=(16, 32), mean_doc=16, iters=1,
    bench_batch=2, bench_args=("--device", "cpu", "--gpu-size", "nano", "--gpu-seq", "128", "--batch", "2",
                               "--steps", "2", "--warmup", "1", "--mean-doc", "16", "--loss-chunk", "128",
                               "--compile-backend", "eager"),
    fit_steps=4, fsdp_steps=2, workers="0,2",
    loader_args=("--sources", "1200", "--generations", "4", "--seq-len", "128", "--batch", "8", "--batches", "5"),
    recipe_sets=("demo.num_documents=200", "data.generations=2", "data.seq_len=64", "model.size=nano",
                 "data.val.num_iid=8", "data.val.num_long=4", "data.val.num_short=4", "data.val.max_windows=4",
                 "train.global_batch_size=4", "train.micro_batch_size=4", "train.num_threads=1"),
    dry_run_sets=("model.size=nano", "data.seq_len=128", "train.micro_batch_size=2", "model.loss_chunk_size=128"),
)
# bf16 against fp32 demo fits: the final losses must agree within this fraction. Both fits start from
# the same weights and see the same batches; bf16 rounds each matmul's inputs to 8 mantissa bits
# (~0.4%), and the runs drift apart from there. On the CPU the two 60-step fits of the demo end
# 0.002% apart (train/loss 4.5443 vs 4.5442); CUDA's bf16 kernels (flash attention, the compiled
# loss) round differently, so 2% leaves them room and still catches a broken mixed-precision path
# (a mask dropped, a loss reduced in bf16), which moves the loss by several percent within steps.
FIT_TOLERANCE = 0.02


def smoke() -> bool:
    return os.environ.get("GPU_CHECK_SMOKE") == "1"


def sizes() -> Sizes:
    return SMOKE if smoke() else GPU


def work_dir() -> Path:
    return Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work"))


def time_left() -> float:
    """Seconds until this step's limit, less a margin to report in."""
    return float(os.environ.get("GPU_CHECK_STEP_END", "inf")) - time.time() - 3


def result(text: str) -> None:
    """One line of the step's cell in the summary."""
    print(f"RESULT: {text}", flush=True)


# ---------------------------------------------------------------------------------------------
# torch helpers (imported inside the steps: summary, wheels and bundle need no torch)


def device() -> Any:
    """CUDA when there is a GPU; the CPU in the smoke run; otherwise None (the step says why)."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke():
        return torch.device("cpu")
    result("skipped: no GPU (GPU_CHECK_SMOKE=1 runs the CPU smoke sizes)")
    return None


def sync(dev: Any) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def ms_per_call(fn: Callable[[], Any], dev: Any, iters: int) -> float:
    """Milliseconds per call of ``fn`` after one untimed call."""
    fn()
    sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(dev)
    return (time.perf_counter() - t) / iters * 1e3


def segment_ids(B: int, T: int, mean_len: int, seed: int) -> Any:
    """(B, T) int32 segment ids: exponential document lengths (bench_train_step's), then length-1
    segments forced at each row's first and last token and at a few tokens in between."""
    import torch

    sys.path.insert(0, str(BENCH))
    from bench_train_step import _doc_segments

    seg = _doc_segments(B, T, mean_len, seed)
    starts = torch.zeros(B, T, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    g = torch.Generator().manual_seed(seed + 1)
    for t in [0, T - 1] + torch.randint(1, T - 1, (4,), generator=g).tolist():
        starts[:, t] = True  # token t starts a segment...
        if t + 1 < T:
            starts[:, t + 1] = True  # ...and the next token starts another
    starts[:, 0] = False
    return starts.cumsum(dim=1).to(torch.int32)


def contract_batch(vocab: int, B: int, T: int, mean_len: int, seed: int, dev: Any) -> dict:
    """A batch of the loader's contract (megadoc_pl.data.batch.unpack) with random tokens."""
    import torch

    from megadoc_pl.model.attention import cu_seqlens_from_segment_ids, positions_from_segment_ids

    seg = segment_ids(B, T, mean_len, seed)
    cu, max_len = cu_seqlens_from_segment_ids(seg)
    window = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": window[:, :-1].to(dev), "targets": window[:, 1:].to(dev), "segment_ids": seg.to(dev),
            "cu_seqlens": cu.to(dev), "max_seqlen": max_len, "position_ids": positions_from_segment_ids(seg).to(dev)}


def skip_reason(backend: str, dev: Any, gqa: bool = False) -> Optional[str]:
    """Why ``backend`` cannot run here (None: it can)."""
    from megadoc_pl.model.attention import has_flash_attn, torch_varlen_keywords

    if backend in ("flash_attn", "torch_varlen") and dev.type != "cuda":
        return "skipped: no GPU"
    if backend == "flash_attn" and not has_flash_attn():
        return "skipped: flash_attn not installed"
    if backend == "torch_varlen":
        try:
            keywords = torch_varlen_keywords()
        except ValueError as e:
            return f"skipped: {e}"
        if gqa and "enable_gqa" not in keywords:
            return "skipped: this torch's varlen_attn takes no enable_gqa"
    return None


def has_backward(backend: str, dev: Any) -> bool:
    return not (backend == "flex" and dev.type == "cpu")  # flex has no backward on the CPU


def training_backends(dev: Any) -> list[str]:
    """The backends bf16 training can use here, in auto's order of preference."""
    if dev.type != "cuda":
        return ["sdpa"]
    return [b for b in ("flash_attn", "torch_varlen", "flex") if skip_reason(b, dev, gqa=True) is None]


def past_peer(errors: tuple, peer: tuple) -> bool:
    """Whether a bf16 backend's errors exceed twice bf16 sdpa's (the peer, measured first) plus 1e-3."""
    return any(e is not None and e > 2 * (p or 0) + 1e-3 for e, p in zip(errors, peer))


def dynamo_frames() -> int:
    """Frames torch.compile has compiled so far in this process (first compiles and recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


# ---------------------------------------------------------------------------------------------
# sub-runs: one process each, with the step's remaining time


_CHILD: Optional[subprocess.Popen] = None


def _stop_child(signum: int, frame: Any) -> None:
    if _CHILD is not None and _CHILD.poll() is None:
        os.killpg(_CHILD.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def sub_run(cmd: list[str], name: str) -> tuple[int, str]:
    """Run ``cmd`` (its own process group) within the step's remaining time; (rc, output), 124 on timeout.

    The output is copied into this step's log, progress-bar redraws squashed."""
    global _CHILD
    print(f"$ {' '.join(cmd)}", flush=True)
    left = time_left()
    if left < 5:
        print("skipped: out of time", flush=True)
        return 124, ""
    log = work_dir() / "logs" / f"sub-{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        _CHILD = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = _CHILD.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(_CHILD.pid, signal.SIGKILL)
            _CHILD.wait()
            rc = 124
        _CHILD = None
    out = read_log(log)
    print(out, flush=True)
    print(f"[{name}: rc {rc}]", flush=True)
    return rc, out


def read_log(path: Path) -> str:
    """A log's text with each line's carriage-return redraws (progress bars) reduced to the last one."""
    text = path.read_bytes().decode("utf-8", errors="replace")  # bytes: read_text would turn \r into \n
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def summary_json(text: str) -> Any:
    """The JSON after the last ``SUMMARY:`` of a benchmark's output, or None."""
    lines = [ln for ln in text.splitlines() if ln.startswith("SUMMARY:")]
    try:
        return json.loads(lines[-1][len("SUMMARY:"):]) if lines else None
    except json.JSONDecodeError:
        return None


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(no output)"


def cli(command: str, sets: list[str], name: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """``megadoc-pl COMMAND --recipe megadoc_stitch --set ...`` (python3 -m megadoc_pl.train.cli)."""
    cmd = [sys.executable, "-m", "megadoc_pl.train.cli", command, "--recipe", RECIPE]
    cmd += [a for s in sets for a in ("--set", s)]
    cmd += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra]
    return sub_run(cmd, name)


def demo_sets(name: str) -> list[str]:
    """The demo recipe's overrides for run ``name``: runs and caches under the work directory."""
    work = work_dir()
    return [f"data.cache_dir={work / 'cache'}", f"run.root={work / 'runs'}", f"run.name={name}",
            f"train.accelerator={'cpu' if smoke() else 'gpu'}", "train.devices=1", *sizes().recipe_sets]


def run_metrics(name: str) -> dict:
    path = work_dir() / "runs" / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def loss_text(m: dict, key: str) -> str:
    return f"{m[key]:.4f}" if isinstance(m.get(key), (int, float)) else "n/a"


# ---------------------------------------------------------------------------------------------
# steps


def step_versions() -> bool:
    import importlib.metadata
    import platform

    import lightning
    import torch
    import transformers

    from megadoc_pl.model.attention import has_flash_attn, resolve_backend, torch_varlen_keywords

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        smi = ""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = (f"{p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}, "
               f"{torch.cuda.device_count()} device(s); nvidia-smi: {smi or 'n/a'}")
    else:
        gpu = "skipped: no GPU"
    result(f"GPU: {gpu}")

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    result(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
           f"lightning {lightning.__version__}, transformers {transformers.__version__}, triton {version('triton')}")
    result("bundled: " + ", ".join(f"{d} {version(d)}" for d in WHEELS))
    try:
        varlen = str(torch_varlen_keywords())
    except ValueError as e:
        varlen = f"unusable ({e})"
    auto = resolve_backend("auto", torch.device("cuda"), torch.bfloat16)
    result(f"attention auto (cuda, bf16) -> {auto}; flash_attn {'importable' if has_flash_attn() else 'absent'}; "
           f"torch_varlen keywords {varlen}")
    import jsonargparse  # noqa: F401  (the CLI's dependencies import: the bundle is complete)
    import omegaconf  # noqa: F401
    import orjson  # noqa: F401
    import zstandard  # noqa: F401

    return True


def step_attention() -> bool:
    """Each backend in bf16 against fp32 sdpa (dense mask), forward and backward, at real shapes."""
    import torch

    from megadoc_pl.model.attention import attention, cu_seqlens_from_segment_ids, segment_mask

    dev, sz = device(), sizes()
    if dev is None:
        return True
    seg = segment_ids(sz.batch, sz.seq, sz.mean_doc, seed=0)
    cu, max_len = cu_seqlens_from_segment_ids(seg)
    lengths = cu.diff()
    seg, cu = seg.to(dev), cu.to(dev)
    result(f"B={sz.batch} T={sz.seq}: {len(lengths)} segments, {int((lengths == 1).sum())} of length 1, longest "
           f"{max_len}. Per backend in bf16 vs fp32 sdpa: forward max |err|, gradient ||g - g_ref|| / ||g_ref|| (worst "
           f"of q, k, v), ms per forward + backward; CHECK: over 2x bf16 sdpa's error + 1e-3")
    ok = True
    for D in sz.head_dims:
        for H, KV in sz.heads:
            g = torch.Generator(device=dev).manual_seed(D * 100 + KV)
            q, k, v = (torch.randn(sz.batch, sz.seq, h, D, device=dev, generator=g) for h in (H, KV, KV))
            dout = torch.randn(sz.batch, sz.seq, H, D, device=dev, generator=g)

            def run(mask: Any, dtype: torch.dtype, grads: bool) -> tuple[Any, list]:
                leaves = [x.detach().to(dtype).requires_grad_(grads) for x in (q, k, v)]
                out = attention(*leaves, mask)
                if grads:
                    out.backward(dout.to(dtype))
                return out.detach().float(), [x.grad.float() if grads else None for x in leaves]

            ref_out, ref_grads = run(segment_mask("sdpa", seg, torch.float32, cu, max_len), torch.float32, True)
            parts, peer = [], None
            for backend in ("sdpa", "flex", "torch_varlen", "flash_attn"):
                reason = skip_reason(backend, dev, gqa=KV < H)
                if reason:
                    parts.append(f"{backend} {reason}")
                    continue
                grads = has_backward(backend, dev)
                try:
                    mask = segment_mask(backend, seg, torch.bfloat16, cu, max_len)
                    out, grad_list = run(mask, torch.bfloat16, grads)
                    fwd = (out - ref_out).abs().max().item()
                    grad = max(((a - b).norm() / b.norm()).item() for a, b in zip(grad_list, ref_grads)) if grads else None
                    ms = ms_per_call(lambda: run(mask, torch.bfloat16, grads), dev, sz.iters)
                except Exception as e:  # one broken backend must not hide the others
                    parts.append(f"{backend} error: {type(e).__name__}: {str(e)[:120]}")
                    ok = False
                    continue
                peer = peer or (fwd, grad)
                bad = past_peer((fwd, grad), peer)
                ok &= not bad
                grad_text = f"grad {grad:.1e}" if grad is not None else "grad n/a (no flex backward on the CPU)"
                parts.append(f"{backend} fwd {fwd:.1e} {grad_text} {ms:.2f} ms{' CHECK' if bad else ''}")
            result(f"D={D} H={H}/{KV}: " + "; ".join(parts))
    return ok


def step_model_init() -> bool:
    """The model's loss and gradients at init on one batch: fp32 sdpa, then bf16 autocast per backend."""
    import torch

    from megadoc_pl.eval.scoring import hidden_states
    from megadoc_pl.model.llama import Llama, LlamaConfig

    dev, sz = device(), sizes()
    if dev is None:
        return True
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name(sz.model, attention_backend="sdpa", loss_impl="chunked")).to(dev)
    batch = contract_batch(model.cfg.vocab_size, sz.batch, sz.seq, sz.mean_doc, seed=0, dev=dev)

    def run(backend: str, bf16: bool) -> tuple[float, Any]:
        model.cfg.attention_backend = backend
        model.zero_grad(set_to_none=True)
        grads = has_backward(backend, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grads):
            loss = model.loss(hidden_states(model, batch), batch["targets"])
        if not grads:
            return loss.item(), None
        loss.backward()
        return loss.item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])

    ref_loss, ref_g = run("sdpa", False)
    ref_norm = ref_g.norm().item()
    result(f"{sz.model} B={sz.batch} T={sz.seq}, {model.cfg.num_params():,} params: fp32 sdpa loss {ref_loss:.4f} "
           f"(ln V = {math.log(model.cfg.vocab_size):.4f}), grad norm {ref_norm:.4f}")
    ok, peer = True, None
    for backend in ("sdpa", "flash_attn", "torch_varlen", "flex"):
        reason = skip_reason(backend, dev, gqa=model.cfg.n_kv_heads < model.cfg.n_heads)
        if reason:
            result(f"bf16 {backend}: {reason}")
            continue
        try:
            loss, g = run(backend, True)
        except Exception as e:
            result(f"bf16 {backend}: error: {type(e).__name__}: {str(e)[:160]}")
            ok = False
            continue
        dloss = abs(loss - ref_loss)
        if g is None:
            result(f"bf16 {backend}: loss {loss:.4f} (|d| {dloss:.1e}); no gradients (no flex backward on the CPU)")
            continue
        rel = ((g - ref_g).norm() / ref_norm).item()
        peer = peer or (dloss, rel)
        bad = past_peer((dloss, rel), peer)
        ok &= not bad
        result(f"bf16 {backend}: loss {loss:.4f} (|d| {dloss:.1e}), grad norm {g.norm().item():.4f}, "
               f"||g - g_fp32|| / ||g_fp32|| {rel:.1e}{' CHECK' if bad else ''}")
    return ok


def step_recompiles() -> bool:
    """torch.compile'd model (2 layers of the model size) over 3 new segmentations after a warm-up."""
    import torch

    from megadoc_pl.model.llama import Llama, LlamaConfig

    dev, sz = device(), sizes()
    if dev is None:
        return True
    compile_backend = "inductor" if dev.type == "cuda" else "eager"  # the CPU run checks the plumbing
    backends = ["flex"] + (["torch_varlen"] if skip_reason("torch_varlen", dev, gqa=True) is None else [])
    ok = True
    for backend in backends:
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = LlamaConfig.from_name(sz.model, attention_backend=backend, n_layers=2, loss_impl="chunked")
        model = Llama(cfg).to(dev)
        compiled = torch.compile(model, backend=compile_backend)
        grads = has_backward(backend, dev)

        def step(seed: int) -> None:
            batch = contract_batch(cfg.vocab_size, sz.batch, sz.seq, sz.mean_doc, seed, dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"), \
                    torch.set_grad_enabled(grads):
                mask = model.segment_mask(batch["segment_ids"], batch["cu_seqlens"], batch["max_seqlen"])
                loss = model.loss(compiled(batch["input_ids"], batch["position_ids"], mask), batch["targets"])
            if grads:
                loss.backward()
                model.zero_grad(set_to_none=True)

        t, start = time.perf_counter(), dynamo_frames()
        try:
            for seed in (1, 2):  # the first compiles; a second segmentation may mark shapes dynamic once
                step(seed)
            warm, warm_s = dynamo_frames(), time.perf_counter() - t
            for seed in (3, 4, 5):
                step(seed)
        except Exception as e:
            result(f"{backend}: error: {type(e).__name__}: {str(e)[:160]}")
            ok = False
            continue
        recompiles = dynamo_frames() - warm
        ok &= recompiles == 0
        result(f"compiled {backend} ({compile_backend}, {'forward + backward' if grads else 'forward'}): "
               f"{recompiles} recompiles over 3 new segmentations (expect 0); the warm-up compiled "
               f"{warm - start} frames in {warm_s:.1f} s")
    return ok


def step_throughput() -> bool:
    """bench_train_step.py --gpu per backend: the one auto picks eager (training's default) and
    compiled, then the others eager and compiled, while time lasts; beside them the dry run's memory
    estimate."""
    dev, sz = device(), sizes()
    if dev is None:
        return True
    backends = training_backends(dev)
    runs = [(backends[0], False), (backends[0], True)]
    runs += [(b, False) for b in backends[1:]] + [(b, True) for b in backends[1:]]
    estimate = dry_run_memory()
    if estimate:
        result(f"dry-run memory_per_gpu ({RECIPE} {' '.join(sz.dry_run_sets)}, 1 device, bf16): "
               f"{estimate['total_gib']:.2f} GiB ({', '.join(f'{k} {v:.2f}' for k, v in estimate['gib'].items())})")
    else:
        result("dry-run memory_per_gpu: the dry run failed (see the log)")
    planned = f" (dry run {estimate['total_gib']:.1f})" if estimate else ""
    ok = True
    for backend, compiled in runs:
        mode = "compiled" if compiled else "eager"
        if time_left() < 15:
            result(f"{backend} {mode}: skipped: out of time")
            continue
        cmd = [sys.executable, str(BENCH / "bench_train_step.py"), "--gpu", "--backend", backend, *sz.bench_args]
        rc, out = sub_run(cmd + (["--compile"] if compiled else []), f"throughput-{backend}-{mode}")
        s = summary_json(out)
        if rc or s is None:
            ok = False
            result(f"{backend} {mode}: rc {rc}: {last_line(out)}")
            continue
        mfu = f"MFU {s['mfu']:.1%}" if s["mfu"] is not None else "MFU n/a"
        peak = (f"peak {s['peak_mem_gib']:.1f} GiB{planned}"
                if s["peak_mem_gib"] is not None else "peak memory n/a (CPU)")
        result(f"{backend} {mode}: {s['tokens_per_s']:,.0f} tokens/s, {mfu}, {peak}, {s['ms_per_step']:.1f} ms/step "
               f"(B={s['batch']} T={s['seq']})")
    return ok


def dry_run(overrides: list[str], name: str, assume_tokens: Optional[str] = None) -> tuple[int, str, dict]:
    """``recipes/train.py --recipe megadoc_stitch OVERRIDES --dry-run``: (rc, output, the JSON report)."""
    cmd = [sys.executable, str(ROOT / "recipes" / "train.py"), "--recipe", RECIPE, *overrides, "--dry-run"]
    rc, out = sub_run(cmd + (["--assume-tokens", assume_tokens] if assume_tokens else []), name)
    start = out.find("\n{") + 1 if not out.startswith("{") else 0
    try:
        report = json.loads(out[start:out.rfind("}") + 1]) if rc == 0 else {}
    except json.JSONDecodeError:
        report = {}
    return rc, out, report


def dry_run_memory() -> Optional[dict]:
    """``memory_per_gpu`` of the dry run for the benchmark's model size and batch (assumed stream sizes)."""
    sets = [*sizes().dry_run_sets, "train.devices=1", "train.precision=bf16-mixed"]
    return dry_run(sets, "dry-run", assume_tokens="real=200M,synthetic=3.7B")[2].get("memory_per_gpu")


def step_profiler() -> bool:
    """torch.profiler over one training step (after two warm-ups); the loss wrapped in record_function."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from megadoc_pl.model.llama import Llama, LlamaConfig

    dev, sz = device(), sizes()
    if dev is None:
        return True
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_name(sz.model, attention_backend="auto")).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = contract_batch(model.cfg.vocab_size, sz.bench_batch, sz.seq, sz.mean_doc, seed=0, dev=dev)

    def train_step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            mask = model.segment_mask(batch["segment_ids"], batch["cu_seqlens"], batch["max_seqlen"])
            hidden = model(batch["input_ids"], batch["position_ids"], mask)
            with record_function("loss"):
                loss = model.loss(hidden, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        train_step()
    sync(dev)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        train_step()
        sync(dev)
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=10), flush=True)
    # Device (or, without one, CPU) time under each CPU event: an event's total holds its children's,
    # so the top-level events add up to the whole step and the "loss" range to the loss's share.
    events = [e for e in prof.events() if e.device_type == DeviceType.CPU]
    total_of = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    self_of = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(total_of(e) for e in events if e.cpu_parent is None) or 1.0
    loss_time = sum(total_of(e) for e in events if e.name == "loss")
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and not e.is_user_annotation]
    top = sorted(ops, key=lambda e: getattr(e, self_of), reverse=True)[:10]
    where = "CUDA" if cuda else "CPU (no GPU)"
    result(f"{sz.model} B={sz.bench_batch} T={sz.seq}, attention {mask_backend(model, dev)}: the loss "
           f"({model.cfg.loss_impl} cross-entropy, forward with its gradients) takes {loss_time / total:.1%} "
           f"of the step's {where} time ({total / 1e3:.1f} ms)")
    result(f"top {where} ops (self time): " + ", ".join(f"{e.key} {getattr(e, self_of) / total:.1%}" for e in top))
    return True


def mask_backend(model: Any, dev: Any) -> str:
    import torch

    from megadoc_pl.model.attention import resolve_backend

    return resolve_backend(model.cfg.attention_backend, dev, torch.bfloat16)


def step_prep() -> bool:
    """Build and cache the demo data the fits use (the script runs this beside the first steps)."""
    t = time.perf_counter()
    rc, out, report = dry_run(demo_sets("prep"), "prep")
    result(f"demo data prepared by the dry run in {time.perf_counter() - t:.0f} s: rc {rc}, "
           f"a plan of {report.get('max_steps', '?')} steps" if rc == 0 else f"rc {rc}: {last_line(out)}")
    return rc == 0


def wait_for_prep() -> str:
    """Wait (within the step's time) for the background preparation; what became of it."""
    rc_file, t = work_dir() / "prep.rc", time.perf_counter()
    if not (work_dir() / "prep.pid").exists():
        return "no background preparation"
    while not rc_file.exists() and time_left() > 30:
        time.sleep(1)
    rc = rc_file.read_text().strip() if rc_file.exists() else "still running"
    return f"background data preparation rc {rc}, waited {time.perf_counter() - t:.0f} s"


def step_demo_fits() -> bool:
    """The demo recipe trained in fp32 and in bf16-mixed from the same init and batches; final losses compared."""
    if device() is None:
        return True
    sz = sizes()
    print(wait_for_prep(), flush=True)
    metrics = {}
    for name, precision in (("demo_fp32", "32-true"), ("demo_bf16", "bf16-mixed")):
        rc, out = cli("fit", demo_sets(name) + [f"train.max_steps={sz.fit_steps}", f"train.precision={precision}"], name)
        m = metrics[precision] = run_metrics(name) if rc == 0 else {}
        if rc:
            result(f"{precision}: rc {rc}: {last_line(out)}")
            continue
        result(f"{precision}: {m.get('steps')} steps, train/loss {loss_text(m, 'train/loss')}, "
               f"val/iid/loss {loss_text(m, 'val/iid/loss')}, {m.get('train/tokens_per_s', 0):,.0f} tokens/s")
    a, b = metrics["32-true"], metrics["bf16-mixed"]
    keys = [k for k in ("train/loss", "val/iid/loss") if k in a and k in b]
    if not keys:
        return False
    worst = max(abs(b[k] - a[k]) / abs(a[k]) for k in keys)
    agree = worst <= FIT_TOLERANCE
    result(f"bf16-mixed vs fp32: largest relative difference {worst:.2%} over {', '.join(keys)} "
           f"({'agree' if agree else 'DIFFER'}: tolerance {FIT_TOLERANCE:.0%})")
    return agree


def step_fsdp2() -> bool:
    """A demo fit under fsdp2 with activation checkpointing and sharded checkpoints, then validate from it."""
    if device() is None:
        return True
    sets = demo_sets("fsdp2") + [f"train.max_steps={sizes().fsdp_steps}", "train.strategy=fsdp2",
                                 "train.activation_checkpointing=true", "train.sharded_checkpoints=true"]
    print(wait_for_prep(), flush=True)
    rc, out = cli("fit", sets, "fsdp2-fit")
    m = run_metrics("fsdp2")
    last = work_dir() / "runs" / "fsdp2" / "checkpoints" / "last.ckpt"
    kind = "a directory of shards" if last.is_dir() else "one file" if last.is_file() else "missing"
    if rc:
        result(f"fit: rc {rc}: {last_line(out)}")
        return False
    result(f"fit: {m.get('steps')} steps, train/loss {loss_text(m, 'train/loss')}, "
           f"val/iid/loss {loss_text(m, 'val/iid/loss')}, {m.get('train/tokens_per_s', 0):,.0f} tokens/s; "
           f"last.ckpt is {kind}")
    rc, out = cli("validate", sets, "fsdp2-validate", extra=("--ckpt_path", "last"))
    start = out.rfind("\n{")
    values = json.loads(out[start:out.rfind("}") + 1]) if rc == 0 and start >= 0 else {}
    if rc or not values:
        result(f"validate: rc {rc}: {last_line(out)}")
        return False
    same = "val/iid/loss" in m and "val/iid/loss" in values
    delta = f" (fit's {m['val/iid/loss']:.4f}, |d| {abs(values['val/iid/loss'] - m['val/iid/loss']):.1e})" if same else ""
    result("validate: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()) if k.endswith("/loss")) + delta)
    return True


def step_loader() -> bool:
    """bench_views.py's loader stages (late windows) at each worker count; the GPU unpack it measures."""
    sz = sizes()
    cmd = [sys.executable, str(BENCH / "bench_views.py"), "--root", str(work_dir() / "bench_views"),
           "--views", "", "--positions", "late", "--workers", sz.workers, *sz.loader_args]
    rc, out = sub_run(cmd, "loader")
    stages = summary_json(out)
    if rc or not stages:
        failed = [ln for ln in out.splitlines() if " failed: " in ln]
        result(f"rc {rc}: {(failed or [last_line(out)])[-1][:300]}")
        return False
    for s in stages:
        result(f"{s['workers']} workers: {s['rate'] / s['peer']:.2f}x nanoGPT's get_batch "
               f"({s['rate']:.0f} vs {s['peer']:.0f} batches/s), main-process CPU {s['main_ms']:.2f} ms/batch, "
               f"unpack on the CPU {s['unpack_ms']:.1f} ms")
    gpu = [s["gpu_unpack_ms"] for s in stages if s.get("gpu_unpack_ms")]
    args = dict(zip(sz.loader_args[::2], sz.loader_args[1::2]))
    B, T = args.get("--batch", "64"), args.get("--seq-len", "4096")
    result(f"packed {B} x {T} batch moved to the GPU and unpacked there: {min(gpu):.2f} ms" if gpu
           else "GPU unpack: skipped: no GPU")
    return True


STEPS = {
    "versions": step_versions, "attention": step_attention, "model_init": step_model_init,
    "recompiles": step_recompiles, "throughput": step_throughput, "profiler": step_profiler,
    "prep": step_prep, "demo_fits": step_demo_fits, "fsdp2": step_fsdp2, "loader": step_loader,
}


# ---------------------------------------------------------------------------------------------
# summary (standard library only)


def step_result(log: str) -> str:
    """A step's cell: its RESULT lines, else a benchmark's SUMMARY line, else its last line."""
    lines = log.splitlines()
    results = [ln[len("RESULT:"):].strip() for ln in lines if ln.startswith("RESULT:")]
    if not results:
        summaries = [ln[len("SUMMARY:"):].strip() for ln in lines if ln.startswith("SUMMARY:")]
        results = summaries[-1:] or [last_line(log)]
    return "<br>".join(r.replace("|", "\\|") for r in results)


def write_summary(out: Path, logs: Path) -> str:
    """OUT/summary.md (one table) and OUT/logs.txt (every log) from OUT/steps.tsv and LOGS/*.log."""
    rows = [ln.split("\t") for ln in (out / "steps.tsv").read_text().splitlines() if ln.strip()]
    install = logs / "install.log"
    install_line = last_line(read_log(install)) if install.exists() else "no install log"
    mode = "SMOKE: CPU, toy sizes" if smoke() else "GPU"
    lines = [f"# GPU check ({mode}), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {git_revision()}", "",
             f"Install: {install_line}", "",
             "| step | budget s | rc | seconds | result |", "|---|---|---|---|---|"]
    for name, budget, rc, seconds in rows:
        text = read_log(logs / f"{name}.log") if (logs / f"{name}.log").exists() else ""
        rc_text = {"124": "124 (timeout)", "137": "137 (killed)", "skipped": "skipped (deadline)"}.get(rc, rc)
        cell = step_result(text) if rc != "skipped" else "not run: the script's deadline came first"
        lines.append(f"| {name} | {budget} | {rc_text} | {seconds} | {cell} |")
    budgets = sum(int(r[1]) for r in rows)
    order = [r[0] for r in rows]
    lines += ["", f"Budgets add up to {budgets} s (one H100). The steps run in this order, the cheap and decisive first; "
              "with less time (an H200 handed out after a failed H100 start, a slow start, GPU_CHECK_DEADLINE_S "
              f"lowered) the last ones drop first: {', '.join(reversed(order[-4:]))}. rc 1: a check failed "
              "(the result says which); 124: the step ran out of its budget (it reports what it finished)."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    with open(out / "logs.txt", "w") as f:
        for path in [install] + [logs / f"{r[0]}.log" for r in rows] + [logs / "prep.log"]:
            if path.exists():
                body = read_log(path)
                if len(body) > 200_000:  # keep the head and the end of a runaway log
                    body = body[:50_000] + "\n[... cut ...]\n" + body[-150_000:]
                f.write(f"===== {path.name}\n{body}\n")
    return text


def git_revision() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# the wheel bundle (standard library only)


def wheel_pins() -> list[str]:
    """``NAME==VERSION`` of every wheel `make gpu-bundle` downloads."""
    return [f"{name}=={version}" for name, version in WHEELS.items()]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_bundle(directory: Path) -> list[str]:
    """Problems of a downloaded bundle (none: exactly one wheel of each pin, nothing else, under 64 MiB);
    prints the wheels and the total size."""
    wheels = sorted(directory.glob("*.whl"))
    found: dict[str, list[str]] = {}
    for w in wheels:
        name, version = w.name.split("-")[:2]
        found.setdefault(canonical(name), []).append(version)
        print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
    total = sum(w.stat().st_size for w in wheels)
    print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels (limit {BUNDLE_LIMIT / 2**20:.0f} MiB)")
    pins = {canonical(n): v for n, v in WHEELS.items()}
    problems = [f"{n}: no wheel" for n in pins if n not in found]
    problems += [f"{n}: {', '.join(vs)} (want exactly {pins[n]})" for n, vs in found.items()
                 if n in pins and vs != [pins[n]]]
    problems += [f"{n}: not pinned" for n in found if n not in pins]
    if total > BUNDLE_LIMIT:
        problems.append(f"total {total / 2**20:.1f} MiB over {BUNDLE_LIMIT / 2**20:.0f} MiB")
    return problems


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "wheels":
        print("\n".join(wheel_pins()))
        return 0
    if command == "bundle":
        problems = check_bundle(Path(rest[0]))
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1 if problems else 0
    if command == "summary":
        print(write_summary(Path(rest[0]), Path(rest[1])))
        return 0
    if command not in STEPS:
        print(f"error: unknown step {command!r}; steps: {', '.join(STEPS)}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_child)
    sys.path.insert(0, str(ROOT))
    return 0 if STEPS[command]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
