"""Command line of ``tools/synthesize.py``: flags -> TaskConfig + SynthRunConfig -> runner."""

from __future__ import annotations

import argparse
import json
import sys

from megadoc_pl.synth.backends.base import available_backends
from megadoc_pl.synth.executors import EXECUTORS
from megadoc_pl.synth.outdir import open_out_dir
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.stats import aggregate_stats
from megadoc_pl.synth.tasks import LONG_SOURCES, MAGA_VARIANTS, STYLES, TASKS, TaskConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synthesize.py",
        description="Generate synthetic data (rephrases, rationales, MAGA reformulations, self-distillation "
        "continuations) from a real corpus; sharded, resumable, one JSONL row per generation.",
    )
    g = p.add_argument_group("what to generate")
    g.add_argument("--task", choices=TASKS, required=True)
    g.add_argument("--generations", "-G", type=int, default=None,
                   help="G per document: rephrases, rationales (split points), or maga pairs "
                   "(default 1; maga 5)")
    g.add_argument("--style", choices=STYLES, default="wikipedia", help="rephrase style (WRAP)")
    g.add_argument("--maga-variant", choices=MAGA_VARIANTS, default="base", help="maga stage-2 prompt")
    g.add_argument("--judge", action="store_true", help="maga: score each reformulation 1-5")
    g.add_argument("--prefix-tokens", type=int, default=64,
                   help="self_distill: the teacher (--model: a training checkpoint or its HF export) continues "
                   "this many of each document's first tokens (at most half the document)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="per generation (default: rephrase 1024, rationale 512, maga 4096, self_distill 1024)")
    g.add_argument("--max-source-tokens", type=int, default=4096,
                   help="prompt budget for the source text (rationale: prefix + suffix)")
    g.add_argument("--long-sources", choices=LONG_SOURCES, default="truncate",
                   help="rephrase/maga: truncate long sources, or split them into paragraph chunks "
                   "(G generations per chunk; rows carry chunk_index and views use every chunk)")
    g.add_argument("--min-chunk-tokens", type=int, default=None,
                   help="chunk: no chunk shorter; a short tail is merged with the chunk before it "
                   "(default: max-source-tokens / 8)")
    g.add_argument("--reject-duplicates", action="store_true",
                   help="rephrase: drop completions that nearly repeat another sample of the same prompt")
    g.add_argument("--min-keyword-coverage", type=float, default=0.1,
                   help="maga: drop outputs covering fewer of the source's keywords (0: keep all)")
    g.add_argument("--strip-boilerplate", action=argparse.BooleanOptionalAction, default=None,
                   help="remove chat openers/closers (default: on for maga only)")
    g.add_argument("--prompt-dir", default=None, help="directory of replacement prompt templates")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None,
                   help="training tokenizer (tokenizer.json or dir): budgets and rationale split points")

    d = p.add_argument_group("documents and output")
    d.add_argument("--input", nargs="+", action="extend", required=True,
                   help="JSONL(.gz/.zst) or Parquet files or directories, or fsspec URLs (copied for the run)")
    d.add_argument("--out", required=True,
                   help="output directory, or an fsspec URL (s3://, gs://, memory://: part files per batch)")
    d.add_argument("--text-field", default="text")
    d.add_argument("--id-field", default="id")
    d.add_argument("--skip-bad-rows", action="store_true")
    d.add_argument("--split-file", default=None, help="split.json: held-out documents are refused")
    d.add_argument("--shard", type=int, default=None)
    d.add_argument("--num-shards", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=64, help="documents per backend round")
    d.add_argument("--limit", type=int, default=None, help="at most this many documents in this run")
    d.add_argument("--max-consecutive-failures", type=int, default=8,
                   help="stop when this many requests in a row fail the same way (0: never)")

    r = p.add_argument_group("executor")
    r.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: batches run in this process; ray: streamed through Ray Data to --workers actors "
                   "that each hold a backend (pip install 'megadoc_pl[ray]')")
    r.add_argument("--ray-address", default=None, help="ray: cluster to join (auto, ray://host:10001); "
                   "default: start one on this machine")
    r.add_argument("--workers", type=int, default=1, help="ray: actors, each holding one backend")
    r.add_argument("--worker-gpus", type=float, default=0.0,
                   help="ray: GPUs per actor (vllm: its --tensor-parallel-size)")
    d.add_argument("--gpus", type=int, default=None, help="GPUs billed in stats (default: visible)")
    d.add_argument("--no-progress", action="store_true")

    b = p.add_argument_group("backend")
    b.add_argument("--backend", default="vllm", help=f"one of {', '.join(available_backends())}")
    b.add_argument("--model", default=None, help="model path or name")
    b.add_argument("--dtype", default=None, help="vllm/transformers weights dtype (auto, bfloat16, ...)")
    b.add_argument("--chat-template", default=None, help="Jinja chat template file (override)")
    b.add_argument("--tensor-parallel-size", type=int, default=None, help="vllm")
    b.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm")
    b.add_argument("--max-model-len", type=int, default=None, help="vllm")
    b.add_argument("--no-prefix-caching", action="store_true", help="vllm")
    b.add_argument("--device", default=None, help="transformers: cpu, cuda, cuda:1 ...")
    b.add_argument("--gen-batch-size", type=int, default=None, help="transformers: prompts per generate()")
    b.add_argument("--base-url", default=None, help="openai: e.g. http://host:8000/v1")
    b.add_argument("--api-key-env", default=None, help="openai: env var holding the key")
    b.add_argument("--concurrency", type=int, default=None, help="openai: requests in flight")
    b.add_argument("--request-timeout", type=float, default=None, help="openai: seconds per attempt")
    b.add_argument("--max-retries", type=int, default=None, help="openai")
    b.add_argument("--backend-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra backend keyword (VALUE parsed as JSON when it can be)")
    b.add_argument("--judge-backend", default=None, help="maga judge backend (default: the generator)")
    b.add_argument("--judge-model", default=None)
    b.add_argument("--judge-base-url", default=None)

    p.add_argument("--stats-only", action="store_true", help="only re-aggregate DIR/stats.json")
    return p


def _extra(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--backend-arg {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def backend_kwargs(name: str, a: argparse.Namespace, model: str | None, base_url: str | None) -> dict:
    """The flags that apply to backend ``name``, as its factory's keyword arguments."""
    by_backend = {
        "vllm": dict(model=model, dtype=a.dtype, tensor_parallel_size=a.tensor_parallel_size,
                     gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.max_model_len,
                     seed=a.seed, chat_template=a.chat_template,
                     enable_prefix_caching=False if a.no_prefix_caching else None),
        "transformers": dict(model=model, dtype=a.dtype, device=a.device, batch_size=a.gen_batch_size,
                             chat_template=a.chat_template, raw=True if a.task == "self_distill" else None),
        "openai": dict(model=model, base_url=base_url, api_key_env=a.api_key_env,
                       concurrency=a.concurrency, timeout=a.request_timeout, max_retries=a.max_retries,
                       preflight=True),  # a wrong --base-url is one line at once, not retries per request
    }
    kw = {k: v for k, v in by_backend.get(name, {}).items() if v is not None}
    if name in ("vllm", "transformers") and not model:
        raise ValueError(f"--backend {name} needs --model (a model path or hub name)")
    return kw


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.stats_only:
            print(json.dumps(aggregate_stats(open_out_dir(a.out))["totals"], indent=2))
            return 0
        task_cfg = TaskConfig(
            task=a.task, generations=a.generations, style=a.style, maga_variant=a.maga_variant,
            judge=a.judge, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
            max_source_tokens=a.max_source_tokens, long_sources=a.long_sources,
            min_chunk_tokens=a.min_chunk_tokens, min_keyword_coverage=a.min_keyword_coverage,
            strip_boilerplate=a.strip_boilerplate, seed=a.seed, prompt_dir=a.prompt_dir,
            reject_duplicates=a.reject_duplicates, prefix_tokens=a.prefix_tokens,
        )
        kwargs = {**backend_kwargs(a.backend, a, a.model, a.base_url), **_extra(a.backend_arg)}
        judge_kwargs = {}
        if a.judge_backend is not None:
            judge_kwargs = backend_kwargs(a.judge_backend, a, a.judge_model or a.model,
                                          a.judge_base_url or a.base_url)
        cfg = SynthRunConfig(
            inputs=a.input, out=a.out, backend=a.backend, backend_kwargs=kwargs,
            judge_backend=a.judge_backend, judge_backend_kwargs=judge_kwargs, model=a.model,
            split_file=a.split_file, shard=a.shard, num_shards=a.num_shards, batch_size=a.batch_size,
            text_field=a.text_field, id_field=a.id_field, skip_bad_rows=a.skip_bad_rows,
            tokenizer=a.tokenizer, gpus=a.gpus, limit=a.limit,
            max_consecutive_failures=a.max_consecutive_failures, executor=a.executor,
            ray_address=a.ray_address, workers=a.workers, worker_gpus=a.worker_gpus, progress=not a.no_progress,
        )
        stats = synthesize(task_cfg, cfg)
    except (ValueError, OSError) as e:  # bad input, missing model or file: one line, no traceback
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the runner has shut its backends down on the way out
        print(f"error: interrupted; the rows written so far are kept (fix: rerun the same command to resume "
              f"{a.out})", file=sys.stderr)
        return 130
    run = stats["run"]
    print(
        f"[synth] {stats['task']} shard {stats['shard']}/{stats['num_shards']}: "
        f"{run['rows_written']} rows written, {run['rows_dropped']} dropped, "
        f"{run['failures']} failed requests, {run['completion_tokens']} tokens out in {run['wall_s']:.1f}s "
        f"({run['gpu_hours']:.3f} GPU-h); stats in {a.out.rstrip('/')}/stats.json",
        file=sys.stderr,
    )
    if run["units_not_started"]:
        print(f"[synth] --limit {a.limit}: {run['units_not_started']} more units of this shard are not "
              "started; rerun to continue", file=sys.stderr)
    if run["remaining_units"]:
        print(f"[synth] {run['remaining_units']} units are not finished (failed requests are in "
              f"{a.out.rstrip('/')}/.synth/errors); rerun the same command to retry them",
              file=sys.stderr)
        return 2
    return 0
