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


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_data_never_imports_upward():
    bad = {}
    for path in sorted((PACKAGE / "data").glob("*.py")):
        up = sorted(m for m in _imports(path)
                    if m.startswith(("megadoc_pl.train", "megadoc_pl.eval", "megadoc_pl.analysis")))
        if up:
            bad[path.name] = up
    assert not bad, f"data/ imports from train/, eval/ or analysis/: {bad}"


def test_model_config_and_recipe_schema_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; import megadoc_pl.config, megadoc_pl.model.config, megadoc_pl.recipes; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_choice_is_listed_once():
    """Every module's choice tuple is the config's Literal (``get_args``) or checked equal to it."""
    from megadoc_pl.data import views, windows
    from megadoc_pl.model import attention, loss
    from megadoc_pl.synth import tasks
    from megadoc_pl.train import optim

    assert tuple(get_args(config.View)) == tuple(views.VIEWS)
    assert tuple(get_args(config.RealPosition)) == tuple(views.REAL_POSITIONS)
    assert tuple(get_args(config.Order)) == tuple(views.ORDERS)
    assert tuple(get_args(config.ShortPool)) == tuple(views.SHORT_POOL)
    assert tuple(get_args(config.Scope)) == tuple(windows.SCOPES)
    assert tuple(get_args(config.AttentionBackend)) == tuple(attention.BACKENDS)
    assert tuple(get_args(config.Schedule)) == tuple(optim.SCHEDULES)
    assert tuple(get_args(config.WindowOrder)) == tuple(windows.WINDOW_ORDERS)
    assert tuple(get_args(config.LossImpl)) == tuple(loss.LOSS_IMPLS)
    assert tuple(get_args(config.MagaVariant)) == tuple(tasks.MAGA_VARIANTS)
    # no module spells a choice list of its own: each tuple above is derived from the Literal
    for module, name in ((views, "REAL_POSITIONS"), (views, "ORDERS"), (views, "SHORT_POOL"), (windows, "SCOPES"),
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
