"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu_check.py) in its CPU smoke mode, and its wheel bundle.

The check runs once, unchanged, on a lent offline GPU machine: its plumbing (every step, the time
limits, what lands in OUT) is tested here at toy sizes, and the bundle's pins and checks without
downloading anything.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (a script: a module of its own folder; its dataclass needs sys.modules)
STEPS = ["versions", "attention", "model_init", "recompiles", "throughput", "profiler", "loss", "demo_fits",
         "fsdp2", "loader"]
# steps whose code is the check's own; loss (bench_loss.py) and fsdp2 (its validate) depend on other code
OWN_STEPS = ["versions", "attention", "model_init", "recompiles", "throughput", "profiler", "demo_fits", "loader"]
OUT_FILES = {"summary.md", "steps.tsv", "logs.txt"}
# the packages the GPU machine lacks, by distribution name
MISSING = ["omegaconf", "jsonargparse", "docstring-parser", "typeshed-client", "orjson", "zstandard"]


def script_budgets() -> dict[str, int]:
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    return {name: int(b) for name, b in re.findall(r"^step (\w+) +(\d+) ", text, flags=re.M)}


def table_rows(summary: str) -> list[list[str]]:
    rows = [ln for ln in summary.splitlines() if ln.startswith("| ") and not ln.startswith("| step ")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]


@pytest.mark.slow
def test_smoke_run_reports_every_step_and_writes_only_its_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", GPU_CHECK_WORK=str(work))
    env.pop("GPU_CHECK_STEP_END", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert set(files) <= OUT_FILES and len(files) <= 8, files  # nothing else under OUT, no folders
    summary = (out / "summary.md").read_text()
    rows = table_rows(summary)
    assert [r[0] for r in rows] == STEPS
    assert "| step | budget s | rc | seconds | result |" in summary
    budgets = {r[0]: int(r[1]) for r in rows}
    assert budgets == script_budgets() and sum(budgets.values()) <= 540
    rc = {r[0]: r[2] for r in rows}
    assert all(rc[s] == "0" for s in OWN_STEPS), {s: (rc[s], r[4][:300]) for s, r in zip(STEPS, rows)}
    cells = {r[0]: r[4] for r in rows}
    assert "skipped: no GPU" in cells["attention"] and "0 recompiles" in cells["recompiles"]
    assert "agree" in cells["demo_fits"] and "nanoGPT" in cells["loader"]
    assert "drop first: loader, fsdp2, demo_fits, loss" in summary
    logs = (out / "logs.txt").read_text()
    assert all(f"===== {s}.log" in logs for s in STEPS)


def test_budgets_fit_one_command_and_the_docs_list_them():
    budgets = script_budgets()
    assert list(budgets) == STEPS and sum(budgets.values()) <= 540
    docs = (REPO / "docs" / "gpu-check.md").read_text()
    documented = {m[0]: int(m[1]) for m in re.findall(r"^\| \d+ \| `(\w+)` \| (\d+) \|", docs, flags=re.M)}
    assert documented == budgets


def test_wheel_pins_name_each_missing_package_once():
    pins = gpu_check.wheel_pins()
    names = [gpu_check.canonical(p.split("==")[0]) for p in pins]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[\w.-]+==\d+(\.\d+)+", p) for p in pins)
    assert all(names.count(m) == 1 for m in MISSING)
    assert "flash-attn" not in names and "antlr4-python3-runtime" not in names  # omegaconf 2.4 vendors antlr4


def _wheel(directory: Path, name: str, version: str, size: int = 1000) -> None:
    with open(directory / f"{name.replace('-', '_')}-{version}-cp312-cp312-manylinux_2_17_x86_64.whl", "wb") as f:
        f.truncate(size)  # sparse: no disk used


def test_check_bundle_wants_exactly_the_pins_under_64_mib(tmp_path, capsys):
    for name, version in gpu_check.WHEELS.items():
        _wheel(tmp_path, name, version)
    assert gpu_check.check_bundle(tmp_path) == []
    assert "total" in capsys.readouterr().out
    _wheel(tmp_path, "orjson", "3.9.0")  # a second version of a pin
    _wheel(tmp_path, "requests", "2.32.0")  # something not pinned
    (tmp_path / f"omegaconf-{gpu_check.WHEELS['omegaconf']}-cp312-cp312-manylinux_2_17_x86_64.whl").unlink()
    _wheel(tmp_path, "zstandard", gpu_check.WHEELS["zstandard"], size=65 * 2**20)
    problems = "\n".join(gpu_check.check_bundle(tmp_path))
    for expected in ("omegaconf: no wheel", "orjson: 3.13.0, 3.9.0", "requests: not pinned", "over 64 MiB"):
        assert expected in problems


def test_summary_is_one_table_with_results_partial_steps_and_dropped_ones(tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    (out / "steps.tsv").write_text("versions\t15\t0\t3\nattention\t70\t124\t70\nloss\t35\t2\t1\nloader\t50\tskipped\t0\n")
    (logs / "versions.log").write_text("noise\nRESULT: GPU: H100 | 80 GiB\nRESULT: torch 2.11\n")
    (logs / "attention.log").write_text("RESULT: D=64 H=16/16: flex fwd 1e-2\nprogress 1%\rprogress 100%\nTraceback\n")
    (logs / "loss.log").write_text("python3: can't open file 'benchmarks/bench_loss.py'\n")
    text = gpu_check.write_summary(out, logs)
    assert text == (out / "summary.md").read_text()
    rows = {r[0]: r for r in table_rows(text)}
    assert list(rows) == ["versions", "attention", "loss", "loader"]
    assert rows["versions"][4] == r"GPU: H100 \| 80 GiB<br>torch 2.11"
    assert rows["attention"][2] == "124 (timeout)" and rows["attention"][4] == "D=64 H=16/16: flex fwd 1e-2"
    assert "can't open file" in rows["loss"][4]
    assert rows["loader"][2] == "skipped (deadline)"
    assert "drop first: loader, loss, attention, versions" in text
    logs_txt = (out / "logs.txt").read_text()
    assert "===== attention.log" in logs_txt and "progress 100%" in logs_txt and "progress 1%" not in logs_txt


@pytest.mark.skipif(not list((REPO / ".whl").glob("*.whl")), reason="no bundle (make gpu-bundle)")
def test_the_bundle_installs_offline_on_cp312(tmp_path):
    """The script's install line, as pip would run it on the GPU machine's python3 3.12 (a dry run here)."""
    cmd = ["python3", "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--target", str(tmp_path / "site"),
           "--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           *map(str, sorted((REPO / ".whl").glob("*.whl")))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(name in proc.stdout.replace("-", "_") for name in ("omegaconf_", "jsonargparse_", "zstandard_"))
