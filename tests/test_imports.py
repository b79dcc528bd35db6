"""Every module of the package imports without the optional heavy dependencies (optional dependencies are imported where used, with an install hint).

The import runs in a fresh interpreter in which vllm, flash_attn, lm_eval and datasets cannot be
imported, whether or not they are installed here: a module that imports one of them at top level
fails, instead of passing on a machine that happens to have it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("vllm", "flash_attn", "lm_eval", "datasets")

_CHILD = """
import importlib, importlib.abc, json, pkgutil, sys

OPTIONAL = {optional!r}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ImportError(f"{{name}} is blocked: optional dependency")

sys.meta_path.insert(0, Blocked())
import megadoc_pl

names = sorted(m.name for m in pkgutil.walk_packages(megadoc_pl.__path__, "megadoc_pl."))
failed = {{}}
for name in names:
    try:
        importlib.import_module(name)
    except BaseException as e:  # SystemExit from utils.require counts as a failure too
        failed[name] = f"{{type(e).__name__}}: {{e}}"
print(json.dumps({{"modules": names, "failed": failed}}))
"""


def test_every_module_imports_without_optional_dependencies():
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(optional=OPTIONAL)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}
    # the walk really covered the package (its parts and the backends below synth/)
    for name in ("megadoc_pl.data.prepare", "megadoc_pl.dryrun", "megadoc_pl.model.attention", "megadoc_pl.synth.backends.vllm_backend",
                 "megadoc_pl.eval.multiple_choice", "megadoc_pl.demo.template_backend"):
        assert name in result["modules"]


def test_data_preparation_and_dry_runs_import_no_torch():
    # A dry run of a paper-scale recipe must fit its time and memory budget: importing torch
    # costs ~1 s and ~0.2 GB and nothing in preparing data or planning needs it.
    code = ("import sys, megadoc_pl.dryrun, megadoc_pl.data.prepare, megadoc_pl.data.windows, megadoc_pl.model.flops; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_reading_checkpoints_imports_no_lightning():
    # The tools that read checkpoints (export, evaluate, a teacher) start ~3 s sooner without it.
    code = "import sys, megadoc_pl.checkpoints; print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning'}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
