"""Judged MAGA generation directories -> supervised fine-tuning examples for the tool model.

The prompts are rebuilt exactly as the teacher saw them: the generation directory's ``run.json``
holds the task settings and inputs, the source documents are read again and cut into the same
units (truncated or chunked under the same budget tokenizer), and the same prompt templates are
rendered (their versions must match the ones recorded in the rows). Two kinds of example:

- ``pairs`` (SLM-1): unit text -> its (genre, audience) pairs, written back as the flat JSON the
  stage-1 prompt asks for. Pairs are not judged themselves; a unit's pairs are kept when at least
  ``pairs_min_passed`` of them (default all) led to a reformulation that passed the judge.
- ``reformulate`` (SLM-2): unit text + one pair -> the cleaned reformulation, kept when its
  ``judge_score >= min_score`` (the ICLR formalisation: D_SFT = {(D, G, D') : S(D') >= 3}).

Held-out hygiene (``data/hygiene.py``): a source that the split file holds out, or whose
normalised text equals a held-out document's, gives no example, whatever the generation run did.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

STAGES = ("pairs", "reformulate")


@dataclass
class DatasetConfig:
    """What goes into the SFT set (recorded in OUT/manifest.json)."""

    gen_dirs: list[str]  # maga output directories (tools/synthesize.py --task maga --judge), one per round
    out: str  # writes OUT/sft.jsonl and OUT/manifest.json
    min_score: int = 3  # keep reformulations with judge_score >= this (MAGA: 3)
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # pairs and/or reformulate
    pairs_min_passed: float = 1.0  # pairs: share of a unit's pairs whose reformulation passed
    split_file: str | None = None  # split.json: its held-out documents give no example
    inputs: list[str] | None = None  # source documents (None: the inputs in each run.json)
    text_field: str = "text"
    id_field: str = "id"
    tokenizer: str | None = None  # the generation run's budget tokenizer (None: as the runner chose it)

    def __post_init__(self) -> None:
        if not 1 <= self.min_score <= 5:
            raise ValueError(f"--min-score must be in [1, 5] (judge scores), got {self.min_score}")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ValueError(f"--stages {','.join(self.stages)}: choose from {', '.join(STAGES)}")
        if not 0.0 < self.pairs_min_passed <= 1.0:
            raise ValueError(f"--pairs-min-passed must be in (0, 1], got {self.pairs_min_passed}")
        if not self.gen_dirs:
            raise ValueError("give at least one generation directory (--gen)")


def pairs_json(pairs: list[list[str]] | list[tuple[str, str]]) -> str:
    """Stage-1 pairs as the flat JSON object the ``maga_pairs`` prompt asks for."""
    obj: dict[str, str] = {}
    for i, (genre, audience) in enumerate(pairs, 1):
        obj[f"genre_{i}"], obj[f"audience_{i}"] = genre, audience
    return json.dumps(obj, ensure_ascii=False, indent=1)


def read_generation_dir(gen_dir: str) -> tuple[dict, list[dict], list[dict]]:
    """(run.json, generation rows, stage-1 state entries) of a maga output directory."""
    from megadoc_pl.synth.outdir import open_out_dir
    from megadoc_pl.synth.sharding import ShardFiles

    out = open_out_dir(gen_dir)
    run_file = out.join(".synth", "run.json")
    if not out.exists(run_file):
        raise ValueError(f"{gen_dir}: no .synth/run.json (fix: pass the --out directory of tools/synthesize.py)")
    run = out.read_json(run_file)
    if run.get("task") != "maga":
        raise ValueError(f"{gen_dir} holds a '{run.get('task')}' run; the tool model learns from --task maga")
    shards = [ShardFiles.of(out, i, run["num_shards"]) for i in range(run["num_shards"])]
    rows = [r for s in shards for r in out.read_rows(s.rows)]
    state = [e for s in shards for e in out.read_rows(s.state)]
    return run, rows, state


class UnitIndex:
    """The units (prompt texts) of a generation run, rebuilt from its inputs and settings."""

    def __init__(self, run: dict, cfg: DatasetConfig, gen_dir: str) -> None:
        from megadoc_pl.synth.tasks import TaskConfig, TokenCounter, make_task
        from megadoc_pl.synth.worker import budget_tokenizer

        self.task_cfg = TaskConfig(**run["task_config"])
        # what the runner counted in: --tokenizer, else the generator's own tokenizer.json
        counter = TokenCounter(budget_tokenizer(cfg.tokenizer or None, run.get("model"), self.task_cfg.task))
        if counter.unit != run.get("budget_unit"):
            raise ValueError(f"{gen_dir}: its prompt budget was counted in {run.get('budget_unit')}, here in "
                             f"{counter.unit} (fix: --tokenizer with the run's --tokenizer)")
        self.task = make_task(self.task_cfg, counter)
        self.inputs = cfg.inputs or run.get("inputs") or []
        self.cfg = cfg

    def documents(self) -> Iterator:
        from megadoc_pl.data.readers import iter_documents

        yield from iter_documents(self.inputs, self.cfg.text_field, self.cfg.id_field)

    def template(self, name: str, recorded: str | None, gen_dir: str):
        t = self.task.template(name)
        if recorded is not None and recorded != t.prompt_version:
            raise ValueError(f"{gen_dir}: rows were generated with prompt {recorded}, the templates here are "
                             f"{t.prompt_version} (fix: --prompt-dir with that run's templates when generating, "
                             "or rebuild from a matching run)")
        return t


def heldout_sources(docs: list, split_file: str | None) -> tuple[set[str], set[str]]:
    """(held-out ids, ids whose normalised text equals a held-out document's) among ``docs``."""
    if split_file is None:
        return set(), set()
    from megadoc_pl.data.hygiene import heldout_duplicates, normalised_text_hash
    from megadoc_pl.data.split import load_heldout_ids

    heldout = set(load_heldout_ids(split_file))
    ids = np.array([d.id for d in docs], dtype=object)
    hashes = np.array([normalised_text_hash(d.text) for d in docs], dtype=np.uint64)
    return heldout, heldout_duplicates(ids, hashes, heldout)


def build_examples(cfg: DatasetConfig) -> tuple[list[dict], dict]:
    """SFT examples of every generation directory, and the counts of what was kept and why not."""
    from megadoc_pl.data.hygiene import check_heldout_generations

    examples: list[dict] = []
    counts: Counter = Counter()
    for gen_dir in cfg.gen_dirs:
        run, rows, state = read_generation_dir(gen_dir)
        index = UnitIndex(run, cfg, gen_dir)
        docs = list(index.documents())
        heldout, same_text = heldout_sources(docs, cfg.split_file)
        sources = np.array([r["source_id"] for r in rows] + [e["source_id"] for e in state], dtype=object)
        counts["heldout_generations"] += check_heldout_generations(sources, heldout, True, cfg.split_file)
        excluded = heldout | same_text
        units = {u.key: u for d in docs if d.id not in excluded for u in index.task.units(d)}
        by_key = {(r["source_id"], int(r["gen_index"])): r for r in rows}
        counts["rows"] += len(rows)
        counts["units_with_pairs"] += len(state)
        passed: set[tuple[str, int]] = set()
        for r in rows:
            score = r.get("judge_score")
            if score is None:
                counts["rows_unjudged"] += 1
            elif score >= cfg.min_score:
                passed.add((r["source_id"], int(r["gen_index"])))
            else:
                counts["rows_below_min_score"] += 1
        counts["rows_passed"] += len(passed)
        for entry in state:
            unit = units.get(entry["key"])
            if unit is None:
                counts["units_excluded" if entry["source_id"] in excluded else "units_not_in_inputs"] += 1
                continue
            gen_indices = [unit.gen_offset + i for i in range(len(entry["pairs"]))]
            if "pairs" in cfg.stages:
                ok = sum((unit.doc.id, g) in passed for g in gen_indices)
                if ok >= cfg.pairs_min_passed * len(gen_indices):
                    t = index.template("maga_pairs", entry.get("prompt_version"), gen_dir)
                    examples.append({
                        "stage": "pairs", "source_id": unit.doc.id, "unit": unit.key,
                        "messages": t.render(text=unit.text, num_pairs=index.task_cfg.generations),
                        "completion": pairs_json(entry["pairs"]), "pairs_passed": ok,
                        "teacher_model": entry.get("model"), "gen_dir": gen_dir,
                    })
                else:
                    counts["pairs_units_below_min_passed"] += 1
            if "reformulate" not in cfg.stages:
                continue
            for g in gen_indices:
                row = by_key.get((unit.doc.id, g))
                if row is None or (unit.doc.id, g) not in passed:
                    continue
                t = index.template(f"maga_reformulate_{row.get('maga_variant', 'base')}",
                                   row.get("prompt_version"), gen_dir)
                examples.append({
                    "stage": "reformulate", "source_id": unit.doc.id, "unit": unit.key, "gen_index": g,
                    "messages": t.render(text=unit.text, genre=row["genre"], audience=row["audience"]),
                    "completion": row["text"], "judge_score": row["judge_score"],
                    "teacher_model": row.get("model"), "gen_dir": gen_dir,
                })
    counts.update(Counter(e["stage"] for e in examples))
    return examples, dict(counts)


def build_dataset(cfg: DatasetConfig) -> dict:
    """Write OUT/sft.jsonl (one example a line) and OUT/manifest.json; returns the manifest."""
    from megadoc_pl.utils import atomic_open, atomic_write_json

    examples, counts = build_examples(cfg)
    if not examples:
        raise ValueError(f"no SFT example passed (counts: {counts}) (fix: judge the runs with --judge, "
                         "or lower --min-score)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "sft.jsonl") as f:
        for e in examples:
            f.write((json.dumps(e, ensure_ascii=False) + "\n").encode("utf-8"))
    manifest = {"config": asdict(cfg), "counts": counts, "examples": len(examples)}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def load_examples(path: str | Path) -> list[dict]:
    """Examples of an ``sft.jsonl`` (a directory holding one is accepted)."""
    p = Path(path)
    p = p / "sft.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"{path}: no sft.jsonl (fix: build it with tools/toolmodel.py dataset)")
    with open(p, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
