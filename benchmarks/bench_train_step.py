"""Training-step benchmark: megadoc_pl's Llama vs Hugging Face LlamaForCausalLM.

CPU (default): forward + backward + AdamW step of a tiny model and of a transformers
LlamaForCausalLM of the same shape (d, layers, heads, kv heads, mlp, vocab, untied) holding the
same weights, on the same batch, interleaved step by step in one run. Prints the median step
times and ours / HF (target <= 1.0).

    python benchmarks/bench_train_step.py                 # tiny, B=8, T=256
    python benchmarks/bench_train_step.py --size small --batch 4 --seq 512

GPU (``--gpu``): tokens/s, MFU and peak memory of ``300m`` at 4096 context in bf16 autocast with
document segments (attention scope ``document``), fused AdamW, optional torch.compile. The last
line starts with ``SUMMARY:`` and a JSON object (parsed by benchmarks/gpu_check.py).

    python benchmarks/bench_train_step.py --gpu [--compile] [--batch 8] [--backend auto]
    python benchmarks/bench_train_step.py --gpu --device cpu --gpu-size nano --gpu-seq 128 --batch 2 \
        --backend sdpa --compile --compile-backend eager      # the same code path on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from megadoc_pl.model.llama import Llama, LlamaConfig


def _hf_twin(model: Llama, attn: str = "sdpa"):
    from transformers import LlamaForCausalLM

    from megadoc_pl.model.hf import to_hf_config, to_hf_state_dict

    from transformers import LlamaConfig as HFLlamaConfig

    hf_cfg = HFLlamaConfig.from_dict(to_hf_config(model.cfg))
    hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(to_hf_state_dict(model), strict=True)
    hf.config._attn_implementation = attn
    hf.config.use_cache = False
    return hf


def _doc_segments(B: int, T: int, mean_len: int, seed: int) -> torch.Tensor:
    """(B, T) segment ids with exponential document lengths (ids increase along each row)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.empty(B, T, dtype=torch.int32)
    for b in range(B):
        t, s = 0, 0
        while t < T:
            n = max(1, int(torch.empty(1).exponential_(1.0 / mean_len, generator=g).item()))
            seg[b, t : t + n] = s
            t, s = t + n, s + 1
    return seg


def bench_cpu(args) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cfg = LlamaConfig.from_name(args.size, attention_backend="sdpa")
    ours = Llama(cfg)
    hf = _hf_twin(ours)
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    ids, targets = window[:, :-1], window[:, 1:]
    seg = _doc_segments(args.batch, args.seq, max(8, args.seq // 4), seed=2)

    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step_ours(segment_ids=None):
        mask = None if segment_ids is None else ours.segment_mask(segment_ids)  # built per batch, as in training
        loss = ours.loss(ours(ids, mask=mask), targets)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_hf():
        logits = hf(input_ids=ids).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)
        return loss

    with torch.no_grad():  # same weights, same batch: same loss before any step
        a = ours.loss(ours(ids), targets).item()
        b = F.cross_entropy(hf(input_ids=ids).logits.flatten(0, 1), targets.flatten()).item()
    assert abs(a - b) < 1e-4, (a, b)

    runs = {"ours": step_ours, "hf": step_hf, "ours_document": lambda: step_ours(seg)}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, fn in runs.items():  # interleaved: machine noise hits all runs alike
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
    tokens = args.batch * args.seq
    print(f"model {args.size} ({cfg.num_params():,} params: d={cfg.d_model} L={cfg.n_layers} H={cfg.n_heads} "
          f"KV={cfg.n_kv_heads} mlp={cfg.d_mlp} V={cfg.vocab_size}), batch {args.batch}x{args.seq}, "
          f"{args.threads} thread(s), torch {torch.__version__}, median of {args.steps} interleaved steps")
    med_w = {k: statistics.median(v) for k, v in wall.items()}
    med_c = {k: statistics.median(v) for k, v in cpu.items()}
    for name in runs:
        print(f"  {name:14s} wall {med_w[name] * 1e3:8.1f} ms/step ({tokens / med_w[name]:7.0f} tok/s)   "
              f"cpu {med_c[name] * 1e3:8.1f} ms/step")
    # On a shared machine the process CPU time is the steadier measure (wall time includes
    # waiting for the cores); both are printed.
    print(f"ratio ours / hf (window scope): wall {med_w['ours'] / med_w['hf']:.3f}, "
          f"cpu {med_c['ours'] / med_c['hf']:.3f}  (target <= 1.0)")


def bench_gpu(args) -> None:
    from megadoc_pl.model.attention import cu_seqlens_from_segment_ids, positions_from_segment_ids
    from megadoc_pl.model.flops import flops_per_token, mean_attended_keys, peak_bf16_flops

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --gpu needs CUDA (use --device cpu only to smoke-test this code path)")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = LlamaConfig.from_name(args.gpu_size, attention_backend=args.backend, loss_chunk_size=args.loss_chunk)
    model = Llama(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    B, T = args.batch, args.gpu_seq
    g = torch.Generator().manual_seed(1)
    window = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    seg = _doc_segments(B, T, args.mean_doc, seed=2)
    cu, max_len = cu_seqlens_from_segment_ids(seg)
    lengths = (cu[1:] - cu[:-1]).tolist()
    batch = {
        "input_ids": window[:, :-1].to(dev), "targets": window[:, 1:].to(dev),
        "segment_ids": seg.to(dev), "position_ids": positions_from_segment_ids(seg).to(dev),
        "cu_seqlens": cu.to(dev), "max_seqlen": max_len,
    }
    fwd = torch.compile(model, backend=args.compile_backend) if args.compile else model

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            # the mask is built outside the (compiled) forward, as in training
            mask = model.segment_mask(batch["segment_ids"], batch["cu_seqlens"], batch["max_seqlen"])
            h = fwd(batch["input_ids"], batch["position_ids"], mask)
            loss = model.loss(h, batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tok_s = B * T / dt
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_bf16_flops(name)
    fpt = flops_per_token(cfg, T, mean_keys=mean_attended_keys(lengths))
    fpt_window = flops_per_token(cfg, T)
    from megadoc_pl.model.attention import resolve_backend

    backend = resolve_backend(cfg.attention_backend, dev, torch.bfloat16)
    print(f"{name}: {args.gpu_size} B={B} T={T} document scope ({len(lengths)} segments, mean {B * T / len(lengths):.0f} "
          f"tokens), backend {backend}, compile={args.compile}, loss {loss.item():.3f}")
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    mem = f"  peak mem {peak_gib:.1f} GiB" if cuda else ""
    print(f"  {dt * 1e3:.1f} ms/step  {tok_s:,.0f} tokens/s{mem}")
    mfu = tok_s * fpt / peak if cuda and peak else None
    if mfu is not None:
        print(f"  MFU {mfu:.1%} (attention counted over the documents' causal pairs); "
              f"{tok_s * fpt_window / peak:.1%} counting whole-window causal attention (target >= 40%)")
    summary = {"device": name, "size": args.gpu_size, "batch": B, "seq": T, "backend": backend,
               "compile": args.compile, "ms_per_step": dt * 1e3, "tokens_per_s": tok_s, "mfu": mfu,
               "mfu_window": tok_s * fpt_window / peak if mfu is not None else None,
               "peak_mem_gib": peak_gib, "loss": loss.item()}
    print("SUMMARY: " + json.dumps(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="GPU tokens/s and MFU instead of the CPU comparison")
    ap.add_argument("--size", default="tiny", help="CPU: named model size")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="CPU: tokens per sequence")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1: CPU time is comparable)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--gpu-size", default="300m", help="GPU: named model size")
    ap.add_argument("--gpu-seq", type=int, default=4096, help="GPU: context length")
    ap.add_argument("--mean-doc", type=int, default=1024, help="GPU: mean document length (tokens)")
    ap.add_argument("--backend", default="auto", help="GPU: attention backend")
    ap.add_argument("--loss-chunk", type=int, default=4096, help="GPU: tokens per loss chunk")
    ap.add_argument("--compile", action="store_true", help="GPU: torch.compile the model")
    ap.add_argument("--compile-backend", default="inductor",
                    help="GPU: torch.compile backend ('eager' only to smoke-test the compiled path on the CPU)")
    ap.add_argument("--device", default="cuda", help="GPU mode's device ('cpu' only to smoke-test the code path)")
    args = ap.parse_args()
    bench_gpu(args) if args.gpu else bench_cpu(args)


if __name__ == "__main__":
    main()
