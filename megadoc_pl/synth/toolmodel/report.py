"""Acceptance of a tool model: its judge histogram next to the teacher's (MAGA Table 1).

MAGA compares the tool SLM with the labeler LLM on the same 15,355 inputs, both scored by the
judge: counts of scores 5..1 and the share >= 3 (92.06% vs 93.11%). Here the student run
reformulates the teacher run's own (document, pair) inputs: ``seed_pairs`` copies the teacher's
stage-1 pairs into the student's fresh output directory, where the runner takes them as done
stage-1 work, so ``tools/synthesize.py --task maga --judge`` with the tool model as generator runs
stage 2 only and has every output judged again by the judge backend given there. ``compare``
then counts the scores of the (source, pair) keys that both runs judged.
"""

from __future__ import annotations

import shutil
from pathlib import Path

SCORES = (5, 4, 3, 2, 1)


def seed_pairs(teacher_dir: str, student_dir: str) -> int:
    """Copy the teacher's stage-1 pairs into a new student directory; returns the units copied.

    The student run must use the teacher's ``--num-shards`` (state files are per shard)."""
    from megadoc_pl.synth.toolmodel.dataset import read_generation_dir

    run, _, state = read_generation_dir(teacher_dir)
    student = Path(student_dir)
    if (student / ".synth").exists():
        raise ValueError(f"{student_dir} already holds a generation run (fix: seed a new, empty --out directory)")
    src = Path(teacher_dir) / ".synth" / "state"
    if not state or not src.is_dir():
        raise ValueError(f"{teacher_dir} has no stage-1 pairs in a local .synth/state (fix: pass a local maga run)")
    (student / ".synth").mkdir(parents=True)
    shutil.copytree(src, student / ".synth" / "state")
    return len(state)


def histogram(rows: list[dict], min_score: int = 3) -> dict:
    """Counts of judge scores 5..1 of ``rows``, the judged total, unjudged rows and the share >= min_score."""
    scores = {s: 0 for s in SCORES}
    unjudged = 0
    for r in rows:
        s = r.get("judge_score")
        if s in scores:
            scores[s] += 1
        else:
            unjudged += 1
    total = sum(scores.values())
    passed = sum(n for s, n in scores.items() if s >= min_score)
    return {"total": total, "scores": scores, "unjudged": unjudged,
            "rate_pass": passed / total if total else 0.0, "judge_models": sorted({str(r.get("judge_model"))
                                                                                 for r in rows if "judge_model" in r})}


def compare(teacher_dir: str, student_dir: str, min_score: int = 3, paired: bool = True) -> dict:
    """Histograms of both runs (``paired``: only the keys judged in both, as Table 1) and the difference."""
    from megadoc_pl.synth.toolmodel.dataset import read_generation_dir

    _, teacher, _ = read_generation_dir(teacher_dir)
    _, student, _ = read_generation_dir(student_dir)
    if paired:
        def judged(rows):
            return {(r["source_id"], int(r["gen_index"])) for r in rows if r.get("judge_score") is not None}

        both = judged(teacher) & judged(student)
        if not both:
            raise ValueError(f"{teacher_dir} and {student_dir} judged no common (source, pair) output (fix: seed the "
                             "student with `tools/toolmodel.py seed-pairs` and run it with --judge)")
        teacher = [r for r in teacher if (r["source_id"], int(r["gen_index"])) in both]
        student = [r for r in student if (r["source_id"], int(r["gen_index"])) in both]
    t, s = histogram(teacher, min_score), histogram(student, min_score)
    return {"min_score": min_score, "paired": paired, "teacher": {"dir": teacher_dir, **t},
            "student": {"dir": student_dir, **s}, "diff": s["rate_pass"] - t["rate_pass"]}


def format_table(report: dict) -> str:
    """The report as MAGA Table 1 (Markdown)."""
    k = report["min_score"]
    lines = [f"| Model | Total | {' | '.join(f'score {s}' if s == 5 else str(s) for s in SCORES)} | Rate(>={k}) | Diff |",
             "|---" * (len(SCORES) + 4) + "|"]
    for name, diff in (("teacher", "-"), ("student", f"{report['diff'] * 100:+.2f}%")):
        h = report[name]
        cells = " | ".join(f"{h['scores'][s]:,}" for s in SCORES)
        lines.append(f"| {name} ({Path(h['dir']).name}) | {h['total']:,} | {cells} | {h['rate_pass'] * 100:.2f}% | {diff} |")
    judges = report["teacher"]["judge_models"], report["student"]["judge_models"]
    if judges[0] != judges[1]:
        lines.append(f"warning: teacher judged by {judges[0]}, student by {judges[1]}; compare scores of one judge")
    return "\n".join(lines)
