"""LM-head loss benchmark: forward + backward of each loss implementation against the chunked walk.

Times ``mean`` cross-entropy of ``hidden @ W.T`` (forward and backward, median, CUDA synchronised)
for every implementation available here: ``chunked`` (the eager walk, the peer every ratio is
against), ``compiled``, ``liger`` (CUDA with Liger-Kernel installed) and ``reference`` (full
logits, when they fit in memory). Also prints peak memory above the inputs (CUDA) and, against
chunked, the loss's absolute error and the gradients' relative errors (norm of the difference
over the norm). The compile of ``compiled`` happens in the warm-up steps.

    python benchmarks/bench_loss.py                    # CUDA: 2 x 4096 tokens, D=1024, V=128256, bf16 autocast
    python benchmarks/bench_loss.py --device cpu       # tiny: 512 tokens, D=64, V=2048, chunk 256, fp32, 1 thread

The last line starts with ``SUMMARY:`` (one line, parsed by GPU check scripts).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time

import torch

from megadoc_pl.model import loss as L

# (tokens, dim, vocab, chunk) when not given: the megadocs head (128,256 vocabulary, 2 x 4096 context) on
# CUDA. compiled pads a chunk to the chunk size, so the CPU chunk divides its tokens.
DEFAULTS = {"cuda": (2 * 4096, 1024, 128256, 1024), "cpu": (512, 64, 2048, 256)}


def _available(device: str, tokens: int, vocab: int) -> list[str]:
    impls = ["chunked", "compiled"]
    if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        impls.append("liger")
    # full logits: bf16 logits, fp32 copy, log-softmax and its gradient
    need = tokens * vocab * 14
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 8 << 30
    if need < 0.8 * free:
        impls.append("reference")
    return impls


def _step(impl: str, h, w, t, chunk: int, autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h.grad = w.grad = None
    with autocast():
        if impl == "reference":
            out = L.reference_cross_entropy(h, w, t)
        else:
            out = L.cross_entropy(h, w, t, chunk_size=chunk, impl=impl)
    out.backward()
    return out.detach(), h.grad, w.grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, help="tokens per step (CUDA default 8192, CPU 512)")
    ap.add_argument("--dim", type=int, help="hidden width D (CUDA default 1024, CPU 64)")
    ap.add_argument("--vocab", type=int, help="vocabulary V (CUDA default 128256, CPU 2048)")
    ap.add_argument("--chunk", type=int, help="tokens per loss chunk (CUDA default 1024, CPU 256)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the compile happens here)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16: autocast (default on CUDA); fp32 (default on CPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (fix: --device cpu)")
    torch.set_num_threads(args.threads)
    given = (args.tokens, args.dim, args.vocab, args.chunk)
    tokens, dim, vocab, chunk = (v if v is not None else d for v, d in zip(given, DEFAULTS[dev]))
    dtype = args.dtype or ("bf16" if dev == "cuda" else "fp32")

    def autocast():
        if dtype == "bf16":
            return torch.autocast(dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    h = torch.randn(1, tokens, dim, device=dev, generator=gen).requires_grad_()
    w = (dim**-0.5 * torch.randn(vocab, dim, device=dev, generator=gen)).requires_grad_()
    t = torch.randint(0, vocab, (1, tokens), device=dev, generator=gen)
    t[0, : tokens // 50] = -100  # a few ignored targets, as at document boundaries

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    impls = _available(dev, tokens, vocab)
    print(f"{dev} {dtype}: {tokens} tokens, D={dim}, V={vocab}, chunk {chunk}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, interleaved")
    if dev == "cuda":
        print(f"  device: {torch.cuda.get_device_name()}")
    results, times, peaks = {}, {i: [] for i in impls}, {}
    for impl in impls:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            results[impl] = _step(impl, h, w, t, chunk, autocast)
        sync()
        if args.warmup:
            print(f"  {impl:9s} warm-up {time.perf_counter() - t0:6.1f} s")
    for _ in range(args.steps):
        for impl in impls:  # round robin: drift in clocks or load hits every implementation alike
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            t0 = time.perf_counter()
            results[impl] = _step(impl, h, w, t, chunk, autocast)
            sync()
            times[impl].append(time.perf_counter() - t0)
            if dev == "cuda":
                peaks[impl] = max(peaks.get(impl, 0), torch.cuda.max_memory_allocated() - base)

    loss0, dh0, dw0 = results["chunked"]
    med = {i: statistics.median(times[i]) * 1e3 for i in impls}
    loss_err, grad_err = 0.0, 0.0
    for impl in impls:
        loss, dh, dw = results[impl]
        err = (loss.float() - loss0.float()).abs().item()
        rel = max(_rel(dh, dh0), _rel(dw, dw0))
        if impl != "reference":
            loss_err, grad_err = max(loss_err, err), max(grad_err, rel)
        peak = f"  peak +{peaks[impl] / 2**20:8.0f} MiB" if impl in peaks else ""
        print(f"  {impl:9s} {med[impl]:9.2f} ms  ({med['chunked'] / med[impl]:5.2f}x chunked){peak}  "
              f"loss {loss.item():.6f} (err {err:.1e})  grad rel err {rel:.1e}")
    missing = [i for i in ("liger", "reference") if i not in impls]
    if missing:
        print(f"  not run: {', '.join(missing)} (liger: CUDA and pip install 'megadoc_pl[liger]'; "
              "reference: full logits must fit)")
    parts = [f"chunked {med['chunked']:.2f} ms"]
    parts += [f"{i} {med[i]:.2f} ms ({med['chunked'] / med[i]:.2f}x)" for i in impls if i != "chunked"]
    print(f"SUMMARY: {', '.join(parts)}; max loss err {loss_err:.1e}, max grad rel err {grad_err:.1e} "
          f"({dev} {dtype}, {tokens} tokens, D={dim}, V={vocab}, chunk {chunk})")


if __name__ == "__main__":
    main()
