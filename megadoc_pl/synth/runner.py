"""The generation runner: shard, skip held-out and finished work, call the backend, append rows.

Layout of an output directory ``DIR`` (shard i of n; every node writes only its own files):

    DIR/shard-0000i-of-0000n.jsonl        generation rows (docs/data-ingest.md), appended in whole batches
    DIR/stats.json                        totals over all shards (rewritten atomically)
    DIR/.synth/run.json                   what is being generated (a rerun must match it)
    DIR/.synth/stats/shard-...json        this shard's counters, cumulative over reruns
    DIR/.synth/errors/shard-...jsonl      failed requests (retried by the next run)
    DIR/.synth/dropped/shard-...jsonl     outputs removed by cleaning (count as done)
    DIR/.synth/state/shard-...jsonl       maga stage-1 pairs (never regenerated)
    DIR/.synth/judged/shard-...jsonl      judge scores of rows kept with judge_pending (folded
                                          into the rows file, rewritten atomically)
    DIR/.synth/locks/shard-....lock       held (flock) while a run writes the shard

With ``--out`` an fsspec URL (object storage) every ``X.jsonl`` above is a folder ``X/`` of part
files, one per completed batch, and the lock is a lease object (outdir.LeaseLock).

Everything auxiliary sits in the hidden ``.synth`` folder so that readers given ``DIR`` see only
generation rows. Resume works at request granularity: on start the runner cuts a torn last line
(a run killed mid-write), collects the finished (source_id, gen_index) pairs, and asks only for
what is missing, so every (source, generation) ends up exactly once however often a run is
killed. A request that fails is recorded and retried by the next run; it never stops this one,
unless ``max_consecutive_failures`` requests in a row fail the same way (a dead server, a wrong
model name, a request the server rejects): then the run stops with one line (``CircuitOpen``).

Only one process writes a shard at a time: a second run of the same shard is refused
(``ShardBusy``) while the first holds the shard's lock. A start that fails validation leaves no
``run.json`` (and removes the directories it created), so the corrected command starts afresh.
The output counters of ``stats.json`` (rows written and dropped, failures, units done) are
recounted from the files on every start, so they are exact after kills; the spend counters
(requests, tokens, wall time) are summed over runs and miss at most the batch a kill interrupted.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from megadoc_pl.errors import BadInput
from megadoc_pl.synth.backends.base import Backend, backend_factory
from megadoc_pl.synth.breaker import CircuitBreaker, CircuitOpen
from megadoc_pl.synth.executors import executor_class, make_executor
from megadoc_pl.synth.outdir import open_out_dir, stage_inputs
from megadoc_pl.synth.run_config import SynthRunConfig
from megadoc_pl.synth.sharding import ShardFiles, resolve_shard, shard_name, shard_of
from megadoc_pl.synth.stats import COUNTERS, FILE_COUNTERS, aggregate_stats
from megadoc_pl.synth.tasks import TaskConfig, TokenCounter, Unit
from megadoc_pl.synth.worker import Batch, load_task, require_raw

RUN_KEYS = ("task", "generations", "style", "maga_variant", "long_sources", "max_source_tokens",
            "min_chunk_tokens", "judge", "num_shards", "model", "budget_unit", "prefix_tokens", "teacher_sha256")


class Runner:
    """One shard of a generation run: works out the pending units, hands them in batches to the
    executor that ``cfg.executor`` names (``executors.py``), and writes what comes back."""

    def __init__(self, task_cfg: TaskConfig, cfg: SynthRunConfig, backend: Backend | None = None,
                 judge_backend: Backend | None = None) -> None:
        from megadoc_pl.data.readers import expand_inputs

        self.t_start = time.perf_counter()  # wall time (and GPU-hours) include loading the model
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.cfg = cfg
        self.task_cfg = task_cfg
        self.out = open_out_dir(cfg.out)
        executor_class(cfg.executor)  # an unknown name is refused before anything else
        self.shard, self.num_shards, self.shard_source = resolve_shard(cfg.shard, cfg.num_shards)
        self._staged = tempfile.TemporaryDirectory(prefix="megadoc_inputs_")  # fsspec URL inputs, copied
        local = stage_inputs(list(cfg.inputs), Path(self._staged.name))
        self.inputs = [str(p) for p in expand_inputs(local)]
        self.input_names = self.inputs if local == list(cfg.inputs) else list(cfg.inputs)  # run.json
        if task_cfg.task == "self_distill":
            self.cfg = cfg = self._with_teacher(cfg, Path(self._staged.name))
        self.files = ShardFiles.of(self.out, self.shard, self.num_shards)
        self.heldout = self._load_heldout(cfg.split_file)
        self.task = load_task(task_cfg, cfg)
        self.run_record = self._check_run_file(self.task.counter)  # before loading a model for minutes
        self._callers_backends = (backend, judge_backend)  # the caller's to close, not this run's
        self.lock = self.out.lock(self.files.lock, f"shard {self.shard} of {self.num_shards} in {self.out}")
        self.lock.acquire()  # a second writer is refused before it loads a model
        try:
            self._check_shard_count()  # after the lock: a concurrent start with another count shows its lock
            self.executor = make_executor(cfg.executor, task_cfg, cfg, self.task, backend, judge_backend)
            self.backends = self.executor.backends  # ray: the driver's view; the actors hold the backends
        except BaseException:
            self._failed_start()
            raise
        self.breaker = CircuitBreaker(cfg.max_consecutive_failures)

    # -- setup

    @staticmethod
    def _with_teacher(cfg: SynthRunConfig, scratch: Path) -> SynthRunConfig:
        """self_distill: the backend loads the teacher's HF directory (a checkpoint is exported to
        ``scratch``) and the run records its provenance. The template backend has no teacher."""
        from dataclasses import replace

        from megadoc_pl.synth.teacher import is_lightning_checkpoint, resolve_teacher

        require_raw(backend_factory(cfg.backend), cfg.backend)  # before exporting a checkpoint for it
        model = cfg.model or cfg.backend_kwargs.get("model")
        if cfg.backend == "template" or not model:
            return cfg
        if executor_class(cfg.executor).remote and is_lightning_checkpoint(Path(model)):
            raise ValueError(f"--executor {cfg.executor} loads the teacher on every node: pass its Hugging Face "
                             f"export, not the checkpoint {model} (fix: python tools/export_hf.py --checkpoint {model} "
                             "--out DIR)")
        hf_dir, teacher = resolve_teacher(model, scratch)
        return replace(cfg, model=model, backend_kwargs={**cfg.backend_kwargs, "model": hf_dir}, teacher=teacher)

    @staticmethod
    def _load_heldout(split_file: str | None) -> set[str]:
        if split_file is None:
            return set()
        from megadoc_pl.data.split import load_heldout_ids

        return set(load_heldout_ids(split_file))

    def _teacher_sha256(self) -> str | None:
        """The checkpoint's sha256 (the same for the checkpoint and its export), else the weights'."""
        teacher = self.cfg.teacher or {}
        return teacher.get("sha256") or teacher.get("weights_sha256")

    def _check_run_file(self, counter: TokenCounter) -> dict | None:
        """Refuse to mix different generation settings or shard counts in one directory; returns
        the record to write once the start has been validated (None: run.json exists)."""
        t = self.task_cfg
        run = {"task": t.task, "generations": t.generations, "style": t.style if t.task == "rephrase" else None,
               "maga_variant": t.maga_variant if t.task == "maga" else None,
               "long_sources": t.long_sources, "max_source_tokens": t.max_source_tokens,
               "min_chunk_tokens": t.min_chunk_tokens if t.long_sources == "chunk" else None,
               "judge": t.judge if t.task == "maga" else None, "num_shards": self.num_shards,
               "model": self.cfg.model or self.cfg.backend_kwargs.get("model"),
               "budget_unit": counter.unit,
               "prefix_tokens": t.prefix_tokens if t.task == "self_distill" else None,
               "teacher_sha256": self._teacher_sha256()}
        if not self.out.exists(self.files.run):
            return {**run, "task_config": asdict(t), "inputs": self.input_names, "split_file": self.cfg.split_file,
                    **({"teacher": self.cfg.teacher} if self.cfg.teacher is not None else {})}
        old = self.out.read_json(self.files.run)
        diff = [k for k in RUN_KEYS if old.get(k) != run.get(k) and k != "num_shards"]  # _check_shard_count
        if diff:
            what = ", ".join(f"{k}={old.get(k)!r} (now {run.get(k)!r})" for k in diff)
            raise ValueError(
                f"{self.out} holds a generation run with other settings: {what} "
                "(fix: rerun with the same settings to resume, or use a new --out)"
            )
        return None

    def _check_shard_count(self) -> None:
        """A directory keeps the shard count it was started with: a document's shard is
        ``stable_hash(id) % num_shards``, so under another count it would be generated again by
        the shard it now falls in. Refused in one line when run.json, or any shard file or lock
        (a concurrent first start, a directory that lost its run.json), names another count."""
        out, n = self.out, self.num_shards
        counts: dict[int, str] = {}
        if out.exists(self.files.run):
            counts[int(out.read_json(self.files.run)["num_shards"])] = ".synth/run.json"
        for folder, pattern in (((), "shard-*-of-*"), ((".synth", "locks"), "shard-*-of-*.lock"),
                                ((".synth", "stats"), "shard-*-of-*.json")):
            for path in out.glob(out.join(*folder), pattern):
                m = re.fullmatch(r"shard-\d+-of-(\d+)(\.jsonl|\.lock|\.json)?", str(path).rsplit("/", 1)[-1])
                if m is not None:
                    counts.setdefault(int(m.group(1)), "/".join((*folder, str(path).rsplit("/", 1)[-1])))
        other = {k: v for k, v in counts.items() if k != n}
        if other:
            k, where = next(iter(other.items()))
            raise ValueError(
                f"{out} is split into {k} shards ({where}), this run into {n}: a document's shard depends on the "
                f"count, so documents would be generated twice (fix: rerun with --num-shards {k}, or the SLURM "
                f"array size {k}; to spread a slow shard's remaining work over more GPUs, run that shard with "
                "--executor ray --workers N)"
            )

    # -- resume state

    def _load_progress(self) -> None:
        for path in (self.files.rows, self.files.dropped, self.files.errors, self.files.state, self.files.judged):
            cut = self.out.repair(path)
            if cut:
                print(f"[synth] {path}: removed a torn last line ({cut} bytes) left by a killed run",
                      file=sys.stderr)
        self._merge_judged()
        self.done: set[tuple[str, int]] = set()
        self.judge_pending: dict[tuple[str, int], dict] = {}
        self.file_counts = {k: 0 for k in FILE_COUNTERS}
        for path, counter in ((self.files.rows, "rows_written"), (self.files.dropped, "rows_dropped")):
            for row in self.out.read_rows(path):
                if row.get("task") == self.task.name:
                    key = (row["source_id"], int(row["gen_index"]))
                    self.done.add(key)
                    self.file_counts[counter] += 1
                    if row.get("judge_pending") and counter == "rows_written":
                        self.judge_pending[key] = row
        # failed attempts by unit key, then request id ("<unit key>|<stage>|<indices>")
        self.attempts_by_unit: dict[str, dict[str, int]] = {}
        for e in self.out.read_rows(self.files.errors):
            per_unit = self.attempts_by_unit.setdefault(e["request_id"].rsplit("|", 2)[0], {})
            per_unit[e["request_id"]] = per_unit.get(e["request_id"], 0) + 1
            self.file_counts["failures"] += 1
        self.state: dict[str, dict] = {e["key"]: e for e in self.out.read_rows(self.files.state)}
        self.prev_stats = self.out.read_json(self.files.stats) if self.out.exists(self.files.stats) else {}

    def _merge_judged(self) -> None:
        """Fold judge results of rows kept with ``judge_pending`` into the rows file."""
        judged = {(e["source_id"], int(e["gen_index"])): e for e in self.out.read_rows(self.files.judged)}
        if not judged:
            return

        def update(row: dict) -> bool:
            e = judged.get((row["source_id"], int(row["gen_index"])))
            if e is None or not row.get("judge_pending"):
                return False
            row.update({k: v for k, v in e.items() if k not in ("source_id", "gen_index")})
            del row["judge_pending"]
            return True

        self.out.rewrite(self.files.rows, update)
        self.out.clear(self.files.judged)  # folded in (a kill before this only repeats the merge)

    def _missing(self, unit: Unit) -> list[int] | None:
        """gen indices still to do ([] when finished; None: stage 1 has not run)."""
        expected = self.task.expected(unit, self.state)
        if expected is None:
            return None
        return [g for g in expected if (unit.doc.id, g) not in self.done]

    def _finished(self, unit: Unit) -> bool:
        return self._missing(unit) == [] and not any(
            (unit.doc.id, g) in self.judge_pending for g in self.task.expected(unit, self.state))

    def _documents(self, counts: dict):
        from megadoc_pl.data.readers import iter_documents

        for doc in iter_documents(self.inputs, self.cfg.text_field, self.cfg.id_field,
                                  self.cfg.skip_bad_rows, counts):
            if doc.id in self.heldout:
                counts["heldout"] = counts.get("heldout", 0) + 1
                continue
            counts["usable"] = counts.get("usable", 0) + 1
            if shard_of(doc.id, self.num_shards) == self.shard:
                yield doc

    def _pending_units(self, counts: dict) -> Iterator[tuple[Unit, list[int] | None]]:
        for doc in self._documents(counts):
            counts["shard_docs"] = counts.get("shard_docs", 0) + 1
            for unit in self.task.units(doc):
                counts["units"] = counts.get("units", 0) + 1
                if not self._finished(unit):
                    yield unit, self._missing(unit)

    # -- main loop

    def run(self) -> dict:
        try:
            self._load_progress()
            # Pre-pass: validate the input, count the held-out and pending work (for the ETA).
            counts: dict = {}
            try:
                pending_all = sum(1 for _ in self._pending_units(counts))
                self._validate_start(counts)
                pending = pending_all if self.cfg.limit is None else min(pending_all, self.cfg.limit)
                results = self.executor.map(self._batches(pending))  # ray: the workers have loaded and sent
                # a first result, so a backend that cannot load fails the start (nothing written yet)
            except BaseException:
                self._failed_start()
                raise
            if self.run_record is not None:
                self.out.write_json(self.files.run, self.run_record)
            return self._generate(pending_all, pending, counts, results)
        finally:
            self.lock.release()
            self._close()

    def _failed_start(self) -> None:
        """A first start that fails leaves nothing behind (an existing run keeps its files)."""
        self._close()
        self.lock.discard()  # removes only what this start created

    def _close(self) -> None:
        """Stop the executor and the backends this run loaded, on every way out (done, failed,
        Ctrl-C): a vLLM engine left running keeps the process from exiting."""
        executor = getattr(self, "executor", None)
        if executor is None or getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            executor.close()
        finally:
            backends = executor.backends
            mine = [b for b in (backends.generator, backends.judge)
                    if b is not None and all(b is not given for given in self._callers_backends)]
            for b in {id(b): b for b in mine}.values():
                close = getattr(b, "close", None)
                if close is not None:
                    close()

    def _validate_start(self, counts: dict) -> None:
        heldout, usable = counts.get("heldout", 0), counts.get("usable", 0)
        if heldout and not usable:
            raise BadInput(
                f"all {heldout} input documents are held-out validation documents in "
                f"{self.cfg.split_file}; they are never used as generation seeds "
                "(fix: pass the training documents, or a split file that holds out fewer)"
            )
        if not usable:
            raise BadInput("the inputs hold no documents (fix: check --input and --text-field)")
        if heldout:  # said once at the start; stats.json counts them as heldout_skipped
            print(f"[synth] skipping {heldout} of {heldout + usable} input documents: held out for validation "
                  f"in {self.cfg.split_file} (never generation seeds)", file=sys.stderr)

    def _generate(self, pending_all: int, pending: int, counts: dict, results) -> dict:
        self.run_stats: dict[str, Any] = {k: 0 for k in COUNTERS}
        self.run_stats.update(by_stage={}, counters={}, heldout_skipped=counts.get("heldout", 0))
        self.gpus = self.cfg.gpus if self.cfg.gpus is not None else self.backends.gpus()
        self.units_total = counts.get("units", 0)
        self.remaining_all = pending_all
        outputs = {name: self.out.appender(path) for name, path in
                   (("rows", self.files.rows), ("dropped", self.files.dropped), ("errors", self.files.errors),
                    ("judged", self.files.judged))}
        self.state_file = self.out.appender(self.files.state)
        start = self.t_start
        finished = 0
        bar = _progress(pending, self.cfg.progress, f"{self.task.name} {shard_name(self.shard, self.num_shards)}")
        try:
            for result in results:
                self._apply(result.output, outputs)
                if result.error is not None:  # the batch was stopped midway: what it did is written
                    raise result.error
                finished += self._batch_done(result.units, start, bar)
        except CircuitOpen:
            self._write_stats(start, complete=False)
            raise
        finally:
            bar.close()
            results.close()  # stops the work in flight (a Ray pipeline) when the run ends early
            for a in outputs.values():
                a.close()
            self.state_file.close()
            self._merge_judged()
        self._warn_duplicates()
        stats = self._write_stats(start, complete=self.remaining_all == 0)
        stats["run"]["remaining_units"] = pending - finished  # of the work this run took on
        stats["run"]["units_not_started"] = pending_all - pending  # left out by --limit
        return stats

    def _batches(self, pending: int) -> Iterator[Batch]:
        """The first ``pending`` unfinished units, in batches of ``batch_size`` (made as the
        executor asks for them)."""
        units: list[tuple[Unit, list[int] | None]] = []
        for taken, item in enumerate(self._pending_units({})):
            if taken == pending:
                break
            units.append(item)
            if len(units) == self.cfg.batch_size:
                yield self._batch(units)
                units = []
        if units:
            yield self._batch(units)

    def _batch(self, units: list[tuple[Unit, list[int] | None]]) -> Batch:
        """Units with the resume state they read: stage-1 state, failed attempts and rows waiting
        for their judge, of these units only (what a Ray actor is sent)."""
        keys = {unit.key for unit, _ in units}
        state = {k: self.state[k] for k in keys if k in self.state}
        attempts = {rid: n for k in keys for rid, n in self.attempts_by_unit.get(k, {}).items()}
        pending = {}
        for unit, _ in units:
            rows = [self.judge_pending[(unit.doc.id, g)] for g in self.task.expected(unit, self.state) or []
                    if (unit.doc.id, g) in self.judge_pending]
            if rows:
                pending[unit.key] = rows
        return Batch(units, state, attempts, pending)

    def _apply(self, result: dict, outputs) -> None:
        """Write what one batch produced and account for it (rows, state, attempts, stats)."""
        self.state_file.write(list(result["new_state"].values()))
        self.state.update(result["new_state"])
        for rid, n in result["new_attempts"].items():
            per_unit = self.attempts_by_unit.setdefault(rid.rsplit("|", 2)[0], {})
            per_unit[rid] = per_unit.get(rid, 0) + n
        outputs["errors"].write(result["errors"])
        outputs["dropped"].write(result["dropped"])
        outputs["rows"].write(result["rows"])
        outputs["judged"].write(result["judged"])
        for row in result["rows"] + result["dropped"]:
            self.done.add((row["source_id"], int(row["gen_index"])))
            if row.get("judge_pending"):
                self.judge_pending[(row["source_id"], int(row["gen_index"]))] = row
        for e in result["judged"]:
            self.judge_pending.pop((e["source_id"], int(e["gen_index"])), None)
        s = self.run_stats
        for k, v in result["stats"].items():
            s[k] += v
        for name in ("by_stage", "counters"):
            for k, v in result[name].items():
                s[name][k] = s[name].get(k, 0) + v
        s["rows_written"] += len(result["rows"])
        s["rows_dropped"] += len(result["dropped"])
        for error in result["outcomes"]:
            self.breaker.record(error)

    def _batch_done(self, units, start: float, bar) -> int:
        s = self.run_stats
        self.breaker.check()  # after the batch's rows are safe (a down judge keeps them)
        finished = sum(1 for unit, _ in units if self._finished(unit))
        self.remaining_all -= finished
        s["units_done"] += finished
        elapsed = time.perf_counter() - start
        bar.update(len(units))
        bar.set_postfix(tok_s=f"{s['completion_tokens'] / max(elapsed, 1e-9):.0f}", fail=s["failures"])
        self._write_stats(start, complete=False)
        return finished

    def _warn_duplicates(self) -> None:
        dup = self.run_stats["counters"].get("near_duplicate_completions", 0)
        if dup:
            total = self.run_stats["completions"]
            action = "dropped" if self.task_cfg.reject_duplicates else "kept (--reject-duplicates drops them)"
            print(f"[synth] warning: {dup} of {total} completions nearly repeat another sample of the same "
                  f"prompt, {action}; the server probably samples greedily or ignores the seed "
                  "(fix: check its sampling settings)", file=sys.stderr)

    def _write_stats(self, start: float, complete: bool) -> dict:
        s = self.run_stats
        s["wall_s"] = round(time.perf_counter() - start, 3)
        s["gpu_hours"] = s["wall_s"] * self.gpus / 3600.0
        prev = self.prev_stats.get("totals", {})
        totals = {k: prev.get(k, 0) + s[k] for k in COUNTERS if k != "heldout_skipped"}
        totals.update({k: self.file_counts[k] + s[k] for k in FILE_COUNTERS})
        totals["units_done"] = self.units_total - self.remaining_all
        totals["heldout_skipped"] = s["heldout_skipped"]
        s.update(self.executor.stats(start))
        run = {**s, "gpus": self.gpus, "backend": self.backends.name, "executor": self.cfg.executor,
               "model": self.backends.model,  # ray: as the workers report it
               "shard_source": self.shard_source, "started": self.started}
        stats = {"shard": self.shard, "num_shards": self.num_shards, "task": self.task.name,
                 "complete": complete, "totals": totals, "units": self.units_total,
                 "prompt_versions": self.task.prompt_versions(),
                 "runs": self.prev_stats.get("runs", []) + [run], "run": run}
        self.out.write_json(self.files.stats, {k: v for k, v in stats.items() if k != "run"})
        aggregate_stats(self.out)
        return stats


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="unit", dynamic_ncols=True, smoothing=0.05)


def __getattr__(name: str):
    """``RunConfig``: the old name of SynthRunConfig, kept (with a warning) for code written against it."""
    if name == "RunConfig":
        import warnings

        warnings.warn("megadoc_pl.synth.runner.RunConfig is deprecated: use SynthRunConfig",
                      DeprecationWarning, stacklevel=2)
        return SynthRunConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def synthesize(task_cfg: TaskConfig, cfg: SynthRunConfig, backend: Backend | None = None,
               judge_backend: Backend | None = None) -> dict:
    """Run (or resume) one shard of a generation job; returns this shard's stats."""
    return Runner(task_cfg, cfg, backend, judge_backend).run()
