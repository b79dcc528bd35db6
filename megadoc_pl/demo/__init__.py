"""The built-in demo: a procedural world, its tokenizer, and template generations, all cached.

A recipe without ``data.real`` trains on the demo. The entry points (training, dry runs,
tools) resolve what data preparation reads with :func:`corpus_inputs` and hand it over; data
preparation itself knows nothing of the demo. The world and tokenizer are built at once, the
generations only when preparation asks for them, after it has decided the validation split
(held-out documents are never generation seeds):

    inputs = corpus_inputs(cfg)                    # the demo's documents.jsonl + tokenizer directory
    prepare_corpus(cfg, inputs)                    # decides the split, then asks
    inputs.generate(task, split_file)              #   for each task of data.view (VIEW_TASKS)

Everything lands under ``cfg.data.cache_dir/demo`` keyed by what decides its content, is
written atomically (generations: resumably, by the synth runner) and is reused when present.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from megadoc_pl.data.views import VIEW_TASKS
from megadoc_pl.errors import BadInput
from megadoc_pl.utils import atomic_write_json, file_fingerprint, file_lock, get_logger, json_fingerprint

if TYPE_CHECKING:
    from megadoc_pl.data.prepare import CorpusInputs

# Bump when the tokenizer training changes: it is part of the tokenizer's cache path.
TOKENIZER_VERSION = 1
MAGA_PAIRS = 5  # MAGA asks for 5 (genre, audience) pairs per document


_log = get_logger("demo")


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder at a time per cache (several ranks or runs may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".lock"):
        yield


def demo_root(cfg: Any) -> Path:
    return Path(cfg.data.cache_dir) / "demo"


def world_dir(cfg: Any) -> Path:
    from megadoc_pl.demo.world import WORLD_VERSION

    return demo_root(cfg) / f"world-v{WORLD_VERSION}-s{int(cfg.demo.seed)}-n{int(cfg.demo.num_documents)}"


def ensure_world(cfg: Any) -> tuple[Path, Path]:
    """The demo documents (JSONL) and the demo tokenizer directory, built on first use."""
    from megadoc_pl.demo.tokenizer import build_demo_tokenizer
    from megadoc_pl.demo.world import write_world

    seed, n, vocab = int(cfg.demo.seed), int(cfg.demo.num_documents), int(cfg.demo.vocab_size)
    wdir = world_dir(cfg)
    docs = wdir / "documents.jsonl"
    tok_dir = wdir / f"tokenizer-bpe{vocab}-v{TOKENIZER_VERSION}"
    with _locked(demo_root(cfg)):
        if not docs.exists():
            _log.info(f"building the demo world: {n} documents (seed {seed}) -> {docs}")
            write_world(docs, seed, n)
        if not (tok_dir / "tokenizer.json").exists():
            _log.info(f"training the demo tokenizer: byte-level BPE, vocab {vocab} -> {tok_dir}")
            build_demo_tokenizer(docs, tok_dir, vocab)
    return docs, tok_dir


def corpus_inputs(cfg: Any) -> "CorpusInputs":
    """What data preparation reads for a recipe: its own paths, or, without ``data.real``, the
    demo's world, its tokenizer (unless ``data.tokenizer`` names one) and a provider of the
    generations ``data.view`` needs (:func:`ensure_generations`, asked after the split)."""
    from megadoc_pl.data.prepare import CorpusInputs

    data = cfg.data
    if data.real is not None:
        return CorpusInputs.from_config(cfg)
    if data.synthetic is not None:
        raise BadInput("data.synthetic is set but data.real is not (fix: set data.real to the corpus the "
                       "generations were made from)")
    real, tokenizer = ensure_world(cfg)

    def generate(task: str, split_file: Optional[Path]) -> Path:
        return ensure_generations(cfg, split_file, task)

    return CorpusInputs(real=(str(real),), tokenizer=str(data.tokenizer if data.tokenizer is not None else tokenizer),
                        generate=generate)


def generation_plan(cfg: Any, task: Optional[str] = None) -> dict | None:
    """What to generate for ``task`` (task and settings; default: the one task ``data.view``
    reads, see ``VIEW_TASKS``), or None for the real-only view."""
    view = str(cfg.data.view)
    if view not in VIEW_TASKS:
        raise BadInput(f"data.view={view!r} is not a view the demo can generate for "
                       f"(fix: choose one of {', '.join(VIEW_TASKS)})")
    if task is None:
        tasks = VIEW_TASKS[view]
        if not tasks:
            return None
        if len(tasks) > 1:
            raise ValueError(f"data.view={view} reads generations of the tasks {', '.join(tasks)}: name one")
        task = tasks[0]
    g = int(cfg.data.generations)
    if g < 1:
        raise BadInput(f"data.view={view} needs data.generations >= 1 (got {g}) (fix: set data.generations=G)")
    plan: dict[str, Any] = {"task": task, "generations": g, "backend": str(cfg.synth.backend),
                            "model": cfg.synth.model}
    if task == "rephrase":
        plan["style"] = str(cfg.synth.style)
    if task == "maga":
        # The view uses the first G reformulations; stage 1 asks for max(5, G) pairs.
        plan.update(generations=max(MAGA_PAIRS, g), maga_variant=str(cfg.synth.maga_variant),
                    judge=bool(cfg.synth.judge))
    return plan


def ensure_generations(cfg: Any, split_file: str | Path | None = None, task: Optional[str] = None) -> Path | None:
    """Generations of ``task`` (default: the one task ``cfg.data.view`` needs) from the demo world,
    via the synth runner; returns the generation rows file, or None when the view needs none.

    Documents held out in ``split_file`` are never used as seeds (the runner refuses them).
    """
    plan = generation_plan(cfg, task)
    if plan is None:
        return None
    from megadoc_pl.demo.template_backend import TEMPLATE_VERSION
    from megadoc_pl.synth.run_config import SynthRunConfig
    from megadoc_pl.synth.runner import synthesize
    from megadoc_pl.synth.tasks import TaskConfig

    real, tokenizer = ensure_world(cfg)
    key = {
        "plan": plan, "world": world_dir(cfg).name, "template_version": TEMPLATE_VERSION,
        "split": file_fingerprint(split_file)["sha256"] if split_file else None,
        "tokenizer": file_fingerprint(tokenizer / "tokenizer.json")["sha256"],  # rationale split points
    }
    out = demo_root(cfg) / "generations" / f"{plan['task']}-{json_fingerprint(key)[:16]}"
    done = out / ".demo-complete.json"
    with _locked(demo_root(cfg)):
        if not done.exists():
            _log.info(f"generating {plan['task']} for view {cfg.data.view} (G={cfg.data.generations}, "
                 f"backend {plan['backend']}) -> {out}")
            task_cfg = TaskConfig(task=plan["task"], generations=plan["generations"],
                                  style=plan.get("style", "wikipedia"),
                                  maga_variant=plan.get("maga_variant", "base"), judge=plan.get("judge", False),
                                  seed=int(cfg.demo.seed))
            backend_kwargs = {"model": plan["model"]} if plan["model"] else {}
            # One shard whatever the environment says (torchrun/SLURM variables would shard it).
            run_cfg = SynthRunConfig(inputs=[str(real)], out=str(out), backend=plan["backend"],
                                     backend_kwargs=backend_kwargs, model=plan["model"],
                                     split_file=str(split_file) if split_file else None,
                                     shard=0, num_shards=1, batch_size=256, tokenizer=str(tokenizer))
            stats = synthesize(task_cfg, run_cfg)
            remaining = stats["run"].get("remaining_units", 0)
            failures = stats["run"].get("failures", 0)
            if remaining or failures:
                raise RuntimeError(
                    f"demo generation into {out} left {remaining} documents unfinished "
                    f"({failures} failed requests; see {out}/.synth/errors) (fix: rerun, it resumes)")
            atomic_write_json(done, {"key": key, "stats": stats["totals"]})
    rows = sorted(out.glob("shard-*.jsonl"))
    assert len(rows) == 1, rows  # one shard by construction
    return rows[0]


__all__ = ["corpus_inputs", "ensure_world", "ensure_generations", "generation_plan"]
