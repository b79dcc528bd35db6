"""Recipe loader: every recipe x scale composes, precedence, one-line errors, recipe values."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from megadoc_pl.config import RecipeConfig
from megadoc_pl.data.batch import SCOPES
from megadoc_pl.data.mixture import budget_plan, paper_plan
from megadoc_pl.data.views import ViewOptions
from megadoc_pl.recipes import describe_all, list_recipes, load_recipe, recipes_dir

METHODS = list_recipes("methods")
SCALES = list_recipes("scales")


def test_all_recipes_and_scales_exist():
    required = {"baseline_real", "rephrase", "megadoc_stitch", "megadoc_stretch", "maga", "maga_mix", "maga_stitch",
                "stitch_real_first", "stitch_real_none", "stitch_shuffled", "stitch_scope_document",
                "stitch_scope_megadoc"}
    assert required <= set(METHODS)
    assert {"demo", "paper_150m", "paper_300m", "paper_600m", "paper_1_5b", "maga_134m", "maga_377m", "maga_1_7b",
            "maga_7b", "maga_13b"} <= set(SCALES)


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_composes_with_every_scale(method):
    from megadoc_pl.model.llama import LlamaConfig

    for scale in SCALES:
        cfg = load_recipe(method, [f"scale={scale}"])
        assert cfg.recipe == method and cfg.scale == scale
        assert cfg.description
        ViewOptions.from_config(cfg.data, int(cfg.train.data_seed)).validate()
        assert cfg.model.attention_scope in SCOPES
        LlamaConfig.from_name(cfg.model.size)  # the model part knows every size a scale names
        G, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
        assert G % m == 0, (method, scale)
        # The mixture is possible: a plan exists for stream sizes of a few batches.
        T = int(cfg.data.seq_len)
        real, syn = 50 * G * T, 400 * G * T
        mix = cfg.data.mixture
        if mix.mode == "paper":
            plan = paper_plan(real, mix.real_epochs, mix.synthetic_fraction, G, T, syn if cfg.data.view != "real" else None)
        else:
            plan = budget_plan({"real": real, "synthetic": syn}, G, T, mix.budget_tokens,
                               OmegaConf.to_container(mix.stream_epochs), OmegaConf.to_container(mix.stream_weights))
        assert plan.steps > 0


def test_paper_defaults_of_the_main_recipes():
    expect = {  # the README's method-recipe table
        "baseline_real": (0, 16, 0.0, 3e-3, 1.6), "rephrase": (32, 16, 0.75, 3e-3, 0.4),
        "megadoc_stitch": (32, 32, 0.9, 1e-3, 0.4), "megadoc_stretch": (32, 32, 0.9, 1e-3, 0.4),
    }
    for name, (G, E, w, lr, wd) in expect.items():
        c = load_recipe(name, ["scale=paper_300m"])
        got = (c.data.generations, c.data.mixture.real_epochs, c.data.mixture.synthetic_fraction, c.train.lr,
               c.train.weight_decay)
        assert got == (G, E, w, lr, wd), name
        assert (c.model.size, c.data.seq_len, c.train.global_batch_size) == ("300m", 4096, 64)
    m = load_recipe("maga_mix", ["scale=maga_377m"])
    assert m.data.mixture.mode == "budget" and dict(m.data.mixture.stream_epochs) == {"real": 2, "synthetic": 2}
    assert (m.model.size, m.data.seq_len, m.train.global_batch_size, m.train.lr, m.train.schedule) == (
        "maga_377m", 8192, 320, 1.5e-3, "wsd")
    abl = {"stitch_real_first": ("real_position", "first"), "stitch_real_none": ("real_position", "none"),
           "stitch_shuffled": ("order", "shuffled")}
    for name, (key, value) in abl.items():
        assert load_recipe(name)["data"][key] == value
    assert load_recipe("stitch_scope_document").model.attention_scope == "document"
    assert load_recipe("stitch_scope_megadoc").model.attention_scope == "megadoc"


def test_precedence_schema_method_scale_cli():
    schema = OmegaConf.structured(RecipeConfig)
    base = load_recipe("megadoc_stitch")  # demo scale by default
    assert base.scale == "demo" and base.model.size == "tiny" and base.data.seq_len == 256
    assert base.train.lr == 1e-3  # method beats the schema
    assert base.data.text_field == schema.data.text_field  # untouched keys keep the schema default
    maga = load_recipe("megadoc_stitch", ["scale=maga_134m"])
    assert maga.train.lr == 3e-3  # a maga_* scale sets the per-size lr: scale beats method
    cli = load_recipe("megadoc_stitch", ["scale=maga_134m", "train.lr=0.02", "data.generations=4"])
    assert cli.train.lr == 0.02 and cli.data.generations == 4  # CLI beats everything
    # scale= may come anywhere among the overrides
    assert load_recipe("rephrase", ["data.seq_len=128", "scale=paper_150m"]).data.seq_len == 128


def test_recipe_errors_are_one_line_and_list_what_exists():
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; available: .*baseline_real.*megadoc_stitch"):
        load_recipe("nope")
    with pytest.raises(ValueError, match=r"unknown scale 'huge'; available: demo, maga_134m"):
        load_recipe("rephrase", ["scale=huge"])
    with pytest.raises(ValueError, match=r"unknown key 'data.foo' \(known keys in data: real, synthetic"):
        load_recipe("rephrase", ["data.foo=1"])
    with pytest.raises(ValueError, match=r"unknown key 'data.mixture.bogus' \(known keys in data.mixture: mode"):
        load_recipe("rephrase", ["data.mixture.bogus=1"])
    with pytest.raises(ValueError, match=r"bad value for 'data.seq_len'"):
        load_recipe("rephrase", ["data.seq_len=abc"])
    with pytest.raises(ValueError, match="is not key=value"):
        load_recipe("rephrase", ["data.seq_len"])
    for err in (lambda: load_recipe("nope"), lambda: load_recipe("rephrase", ["zzz=1"])):
        with pytest.raises(ValueError) as e:
            err()
        assert "\n" not in str(e.value)


def test_bad_recipe_file_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "methods").mkdir()
    (tmp_path / "scales").mkdir()
    (tmp_path / "scales" / "demo.yaml").write_text("model: {size: tiny}\n")
    (tmp_path / "methods" / "typo.yaml").write_text("data:\n  veiw: stitch\n")
    (tmp_path / "methods" / "broken.yaml").write_text("data: [unclosed\n")
    monkeypatch.setenv("MEGADOC_RECIPES", str(tmp_path))
    assert recipes_dir() == tmp_path
    with pytest.raises(ValueError, match=r"typo.yaml: unknown key 'data.veiw'"):
        load_recipe("typo")
    with pytest.raises(ValueError, match=r"broken.yaml: not valid YAML"):
        load_recipe("broken")
    # A recipe may also be given as a path.
    p = tmp_path / "mine.yaml"
    p.write_text("description: mine\ndata: {view: stitch, generations: 2}\n")
    assert load_recipe(str(p)).data.generations == 2


def test_list_and_cli_errors():
    text = describe_all()
    assert "megadoc_stitch" in text and "paper_300m" in text
    out = subprocess.run([sys.executable, "recipes/train.py", "--list"], capture_output=True, text=True,
                         cwd=recipes_dir().parent)
    assert out.returncode == 0 and "maga_mix" in out.stdout and "maga_13b" in out.stdout
    bad = subprocess.run([sys.executable, "recipes/train.py", "--recipe", "nope", "--dry-run"], capture_output=True,
                         text=True, cwd=recipes_dir().parent)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown recipe 'nope'")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_an_override_with_invalid_yaml_is_one_line_naming_it():
    with pytest.raises(ValueError) as e:
        load_recipe("baseline_real", ["train.lr=1e-3", "model.overrides={d_model:"])
    msg = str(e.value)
    assert "\n" not in msg and "override 'model.overrides={d_model:'" in msg and "quote" in msg
