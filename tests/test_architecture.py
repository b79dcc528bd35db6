"""Structure the rest of the code relies on: layering, one list per choice, the recipe -> model mapping, logging."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import get_args

import pytest

from megadoc_pl import config
from megadoc_pl.model.config import LlamaConfig

PACKAGE = Path(__file__).resolve().parents[1] / "megadoc_pl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, at any depth (function-level imports
    included), resolved: ``from megadoc_pl import demo`` is ``megadoc_pl.demo``, ``from . import x``
    and ``from .x import y`` are resolved against the importing module, ``from a.b import c`` is
    ``a.b.c`` when that is a module, else ``a.b``."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    out = set()
    for module in found:
        while module not in MODULES and "." in module:
            module = module.rsplit(".", 1)[0]
        if module in MODULES and module != name:
            out.add(module)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(module: str) -> str:
    """The package a module belongs to: ``megadoc_pl.data.views`` -> ``data``; top-level modules by name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megadoc_pl"


def package_graph() -> str:
    """``layer -> layers it imports``, one line each: printed when a layering test fails."""
    edges: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        edges.setdefault(_layer(module), set()).update(_layer(t) for t in targets if _layer(t) != _layer(module))
    return "\n".join(f"  {a} -> {', '.join(sorted(b)) or '(nothing)'}" for a, b in sorted(edges.items()))


# what a layer must never import (docs/ARCHITECTURE.md, "Layers")
FORBIDDEN = {
    "model": {"data", "demo", "synth", "train", "eval", "analysis", "recipes", "checkpoints"},
    "data": {"demo", "synth", "recipes", "train", "eval", "analysis", "checkpoints"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_never_import_upward(layer):
    bad = {m: sorted(t for t in targets if _layer(t) in FORBIDDEN[layer])
           for m, targets in GRAPH.items() if _layer(m) == layer}
    bad = {m: t for m, t in bad.items() if t}
    assert not bad, f"{layer}/ imports from {sorted(FORBIDDEN[layer])}: {bad}\npackage graph:\n{package_graph()}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the detector works
    cycles = _cycles(GRAPH)
    assert not cycles, f"import cycles between modules: {cycles}\npackage graph:\n{package_graph()}"


def test_the_resolver_sees_package_level_imports():
    """``from megadoc_pl import demo`` (the form the old test missed) resolves to the demo package."""
    import textwrap

    probe = PACKAGE / "data" / "_probe_tmp.py"
    probe.write_text(textwrap.dedent('''
        from megadoc_pl import demo
        from . import views
        from .windows import pack
    '''))
    try:
        MODULES["megadoc_pl.data._probe_tmp"] = probe
        assert _imports("megadoc_pl.data._probe_tmp") == {"megadoc_pl.demo", "megadoc_pl.data.views",
                                                          "megadoc_pl.data.windows"}
    finally:
        MODULES.pop("megadoc_pl.data._probe_tmp", None)
        probe.unlink()


COMMAND_LINE = {"megadoc_pl.train.cli"}  # front doors: the only package modules that may exit


def test_no_system_exit_in_library_code():
    bad = []
    for name, path in MODULES.items():
        if name in COMMAND_LINE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not bad, f"library code raises SystemExit (raise megadoc_pl.errors.BadInput instead): {bad}"


def test_model_config_and_recipe_schema_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; import megadoc_pl.config, megadoc_pl.model.config, megadoc_pl.recipes; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_choice_is_listed_once():
    """Every module's choice tuple is the config's Literal (``get_args``) or checked equal to it."""
    from megadoc_pl.data import batch, views, windows
    from megadoc_pl.model import attention, loss
    from megadoc_pl.synth import tasks
    from megadoc_pl.train import optim

    assert tuple(get_args(config.View)) == tuple(views.VIEWS)
    assert tuple(get_args(config.RealPosition)) == tuple(views.REAL_POSITIONS)
    assert tuple(get_args(config.Order)) == tuple(views.ORDERS)
    assert tuple(get_args(config.ShortPool)) == tuple(views.SHORT_POOL)
    assert tuple(get_args(config.Scope)) == tuple(batch.SCOPES)
    assert tuple(get_args(config.AttentionBackend)) == tuple(attention.BACKENDS)
    assert tuple(get_args(config.Schedule)) == tuple(optim.SCHEDULES)
    assert tuple(get_args(config.WindowOrder)) == tuple(windows.WINDOW_ORDERS)
    assert tuple(get_args(config.LossImpl)) == tuple(loss.LOSS_IMPLS)
    assert tuple(get_args(config.MagaVariant)) == tuple(tasks.MAGA_VARIANTS)
    # no module spells a choice list of its own: each tuple above is derived from the Literal
    for module, name in ((views, "REAL_POSITIONS"), (views, "ORDERS"), (views, "SHORT_POOL"), (batch, "SCOPES"),
                         (windows, "WINDOW_ORDERS"), (attention, "BACKENDS"), (optim, "SCHEDULES"),
                         (loss, "LOSS_IMPLS"), (tasks, "MAGA_VARIANTS")):
        assert f"{name} = get_args(" in Path(module.__file__).read_text(), (module.__name__, name)


def _recipe(**model):
    return {"model": {"size": "tiny", **model}, "data": {"seq_len": 256}}


def test_llama_config_from_recipe():
    cfg = LlamaConfig.from_recipe(_recipe())
    named = LlamaConfig.from_name("tiny")
    assert cfg.max_seq_len == 256 != named.max_seq_len  # the context trained on, not the size's default
    assert cfg.rope_theta == named.rope_theta and cfg.vocab_size == named.vocab_size
    assert LlamaConfig.from_recipe(_recipe(rope_theta=5e5, vocab_size=300)).rope_theta == 5e5
    assert LlamaConfig.from_recipe(_recipe(vocab_size=300)).vocab_size == 300
    assert LlamaConfig.from_recipe(_recipe(), vocab_size=777).vocab_size == 777
    assert LlamaConfig.from_recipe(_recipe(overrides={"max_seq_len": 1024})).max_seq_len == 1024
    with pytest.raises(ValueError, match="max_seq_len=128 is shorter than data.seq_len=256"):
        LlamaConfig.from_recipe(_recipe(overrides={"max_seq_len": 128}))
    with pytest.raises(ValueError, match="unknown model size"):
        LlamaConfig.from_recipe(_recipe(size="300mm"))


def test_a_size_keeps_its_own_rope_base(monkeypatch):
    from megadoc_pl.model import config as model_config

    monkeypatch.setitem(model_config.SIZES, "wide_rope", dict(model_config.SIZES["tiny"], rope_theta=5e5))
    from megadoc_pl.recipes import load_recipe

    cfg = load_recipe("baseline_real", ["model.size=wide_rope"])
    assert cfg.model.rope_theta is None
    from omegaconf import OmegaConf

    assert LlamaConfig.from_recipe(OmegaConf.to_container(cfg)).rope_theta == 5e5


def test_progress_lines_come_from_rank_zero_only(monkeypatch, capsys):
    from megadoc_pl.utils import get_logger

    log = get_logger("test")
    log.info("from rank zero")
    monkeypatch.setenv("LOCAL_RANK", "1")
    log.info("from rank one")
    log.warning("a warning on rank one")
    err = capsys.readouterr().err
    assert "[test] from rank zero" in err and "from rank one" not in err
    assert "[test rank 1] a warning on rank one" in err
    assert logging.getLogger("megadoc_pl").propagate is False


def test_saved_config_explains_every_key_and_loads_back():
    import io

    from omegaconf import OmegaConf

    from megadoc_pl.config import commented_yaml, field_docs
    from megadoc_pl.recipes import load_recipe

    cfg = load_recipe("maga_mix", ["eval.tasks.arc=arc.jsonl", "data.val.extra.ood=ood.jsonl"])
    text = commented_yaml(cfg)
    docs = field_docs()
    comments = {line.strip()[2:] for line in text.splitlines() if line.strip().startswith("# ")}
    missing = [k for k, doc in docs.items() if doc and doc not in comments]
    assert not missing, f"keys without their comment in config.yaml: {missing}"
    back = OmegaConf.merge(OmegaConf.structured(config.RecipeConfig), OmegaConf.load(io.StringIO(text)))
    assert back == cfg
