"""Hugging Face export/import: logits parity with transformers, round trips; loading every kind of
model path (megadoc_pl.checkpoints) and exporting a run with the tokenizer it kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadoc_pl.checkpoints import export_checkpoint, export_hf, load_model
from megadoc_pl.errors import BadInput
from megadoc_pl.model.hf import llama_from_hf, load_hf_weights, to_hf_config
from megadoc_pl.model.llama import Llama, LlamaConfig
from megadoc_pl.train import rundir

REPO = Path(__file__).resolve().parents[2]
VOCAB = 300


def _model(seed: int = 0, **kw) -> Llama:
    torch.manual_seed(seed)
    # GQA and a non-default RoPE base so that both must be carried over correctly
    cfg = LlamaConfig.from_name("nano", vocab_size=VOCAB, **{"rope_theta": 500.0, "attention_backend": "sdpa", **kw})
    return Llama(cfg).eval()


def _ids(T: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(5))


def _hf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(ids).logits


def test_export_loads_in_transformers_with_equal_logits(tmp_path, tiny_tokenizer_path):
    model = _model()
    out = export_hf(model, tmp_path / "hf", tokenizer=tiny_tokenizer_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    ids = _ids()
    with torch.no_grad():
        ours = model.logits(model(ids))
    theirs = _hf_logits(out, ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 1)

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "The quick brown fox founded Brindle."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == Tokenizer.from_file(str(tiny_tokenizer_path)).encode(text).ids
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_export_refuses_to_overwrite_and_bf16(tmp_path):
    model = _model()
    export_hf(model, tmp_path / "hf", dtype="bfloat16")
    with pytest.raises(ValueError, match="already exists"):
        export_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "hf" / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_round_trip_export_import(tmp_path):
    model = _model()
    export_hf(model, tmp_path / "hf")
    back = llama_from_hf(tmp_path / "hf")
    assert back.cfg.rope_theta == 500.0 and back.cfg.n_kv_heads == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, atol=0, rtol=0)
    fresh = load_hf_weights(_model(seed=1), tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(ValueError, match="d_mlp=192 but the recipe.s model has d_mlp=256"):
        load_hf_weights(_model(d_mlp=256), tmp_path / "hf")


@pytest.mark.parametrize("tied", [False, True])
def test_import_transformers_model(tmp_path, tied):
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = HFConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                      rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
    hf = LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(str(tmp_path / "src"))
    ours = llama_from_hf(tmp_path / "src").eval()
    assert (ours.cfg.n_kv_heads, ours.cfg.rope_theta, ours.cfg.d_mlp) == (1, 20000.0, 160)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours.logits(ours(ids)), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_import_rejects_unsupported_configs(tmp_path):
    export_hf(_model(), tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="RoPE scaling"):
        llama_from_hf(tmp_path / "hf")
    with pytest.raises(BadInput, match="no config.json"):
        llama_from_hf(tmp_path)


def test_hf_config_fields():
    cfg = to_hf_config(LlamaConfig.from_name("600m"), bos_token_id=0, eos_token_id=1)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"], cfg["max_position_embeddings"]) == (1024, 24, 16, 8, 3584, 128256, 4096)
    assert cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5


# ---------------------------------------------------------------------------------------------
# Lightning checkpoints (the format of train/module.py: model under `model`, recipe under hparams['cfg'])


def _save_ckpt(path: Path, model: Llama, tokenizer, compiled: bool = False) -> dict:
    cfg = {
        "recipe": "baseline_real",
        "model": {"size": "nano", "vocab_size": None, "attention_backend": "sdpa", "rope_theta": 500.0,
                  "loss_chunk_size": 64, "overrides": {}},
        "data": {"tokenizer": str(tokenizer) if tokenizer else None},
    }
    prefix = "model._orig_mod." if compiled else "model."
    state = {prefix + k: v for k, v in model.state_dict().items()}
    state["some_metric.total"] = torch.zeros(())  # other module state is ignored
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}, "global_step": 3}, path)
    return cfg


@pytest.mark.parametrize("compiled", [False, True])
def test_load_model_from_a_checkpoint(tmp_path, compiled):
    model = _model()
    cfg = _save_ckpt(tmp_path / "last.ckpt", model, None, compiled)
    loaded = load_model(tmp_path / "last.ckpt")
    assert loaded.recipe == cfg and loaded.step == 3 and loaded.tokenizer is None
    m = loaded.model
    assert m.cfg.vocab_size == VOCAB and m.cfg.loss_chunk_size == 64 and m.cfg.rope_theta == 500.0
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(m(ids), model(ids), atol=0, rtol=0)


def _save_sharded(path: Path, model: Llama, cfg: dict) -> None:
    """What train.sharded_checkpoints writes, in one process: torch.distributed.checkpoint shards of
    the state dict beside Lightning's meta.pt (everything else)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is ... uninitialized, assuming ... a single process"
        dcp.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, checkpoint_id=str(path))
    torch.save({"hyper_parameters": {"cfg": cfg}, "global_step": 3}, path / "meta.pt")


def test_every_kind_of_model_path_loads_the_same_weights(tmp_path, tiny_tokenizer_path):
    """A .ckpt, a sharded checkpoint directory, a run directory and an HF export of one model."""
    model = _model()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = _save_ckpt(run / "checkpoints" / "last.ckpt", model, tiny_tokenizer_path)
    _save_sharded(tmp_path / "sharded.ckpt", model, cfg)
    export_hf(model, tmp_path / "hf", tokenizer=tiny_tokenizer_path)
    paths = {"ckpt": run / "checkpoints" / "last.ckpt", "sharded": tmp_path / "sharded.ckpt", "run": run,
             "hf": tmp_path / "hf"}
    loaded = {kind: load_model(p) for kind, p in paths.items()}
    for kind, x in loaded.items():
        assert not x.model.training, kind
        for name, v in model.state_dict().items():
            assert torch.equal(x.model.state_dict()[name], v), (kind, name)
    assert loaded["run"].path == paths["ckpt"]
    assert [loaded[k].recipe == cfg and loaded[k].step == 3 for k in ("ckpt", "sharded", "run")] == [True] * 3
    assert loaded["hf"].recipe is None and loaded["hf"].tokenizer == tmp_path / "hf"
    # no tokenizer/ in the run (written before runs kept one): the recipe's data.tokenizer
    assert loaded["run"].tokenizer == tiny_tokenizer_path
    rundir.save_tokenizer(run, tiny_tokenizer_path)
    assert load_model(run).tokenizer == run / "tokenizer"
    half = load_model(run, dtype=torch.bfloat16).model
    assert half.lm_head.weight.dtype == torch.bfloat16
    for bad, problem in ((tmp_path / "none", "no such model checkpoint"), (tmp_path, "neither a checkpoint")):
        with pytest.raises(BadInput, match=problem):
            load_model(bad)


def test_the_three_loaders_of_a_trained_model_are_load_model(tmp_path, tiny_tokenizer_path, monkeypatch):
    """Evaluation, loss patterns and the embedding map read checkpoints through load_model."""
    import megadoc_pl.checkpoints as checkpoints
    from megadoc_pl.analysis import embed_map, loss_patterns
    from megadoc_pl.eval import runner

    ckpt = tmp_path / "last.ckpt"
    _save_ckpt(ckpt, _model(), tiny_tokenizer_path)
    calls = []

    def spy(path, **kw):
        calls.append(Path(path))
        return load(path, **kw)

    load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", spy)
    (loaded,) = runner.load_models([str(ckpt)])
    assert loaded.recipe["data"]["tokenizer"] == str(tiny_tokenizer_path)
    assert len(loss_patterns.load_scoring_model(ckpt)([0, 5, 7, 9])) == 3
    assert embed_map.load_embedder(str(ckpt)).fingerprint  # the tokenizer found beside the model
    assert calls == [ckpt] * 3


def test_export_tool_end_to_end(tmp_path, tiny_tokenizer_path):
    model = _model()
    _save_ckpt(tmp_path / "last.ckpt", model, tiny_tokenizer_path)
    run = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(tmp_path / "last.ckpt"),
                          "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(tmp_path / "hf", ids), model.logits(model(ids)), atol=1e-4, rtol=1e-4)
    again = subprocess.run([sys.executable, str(REPO / "tools" / "export_hf.py"), "--checkpoint", str(tmp_path / "last.ckpt"),
                            "--out", str(tmp_path / "hf")], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_export_of_a_demo_run_reads_the_tokenizer_it_kept(tmp_path, monkeypatch):
    """A demo recipe names no data.tokenizer: its run keeps a copy of the demo's (train/rundir.py)
    and the export reads that. Exported from a directory where the demo was never built, nothing
    is built there (the demo's data.cache_dir is relative to the current directory)."""
    import shutil

    from omegaconf import OmegaConf
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.demo import ensure_world

    cfg = OmegaConf.structured(RecipeConfig)
    cfg.demo.num_documents, cfg.demo.vocab_size = 20, VOCAB
    cfg.model.size, cfg.model.rope_theta, cfg.model.attention_backend = "nano", 500.0, "sdpa"
    trained_in, elsewhere = tmp_path / "trained_in", tmp_path / "elsewhere"
    trained_in.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(trained_in)
    demo_tokenizer = trained_in / ensure_world(cfg)[1]  # what training builds (under the relative cache_dir)
    run = trained_in / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    rundir.save_tokenizer(run, demo_tokenizer)  # what the run keeps
    model = _model()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"cfg": OmegaConf.to_container(cfg, resolve=True)}, "global_step": 1},
               run / "checkpoints" / "last.ckpt")

    monkeypatch.chdir(elsewhere)
    out = export_checkpoint(run, tmp_path / "hf")
    assert list(elsewhere.iterdir()) == []  # no demo world, no BPE trained here
    text = "The town was founded by a miller."
    theirs = AutoTokenizer.from_pretrained(str(out))
    assert theirs(text, add_special_tokens=False)["input_ids"] == \
        Tokenizer.from_file(str(demo_tokenizer / "tokenizer.json")).encode(text).ids
    assert json.loads((out / "megadoc_export.json").read_text())["step"] == 1
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(_hf_logits(out, ids), model.logits(model(ids)), atol=1e-4, rtol=1e-4)

    shutil.rmtree(run / "tokenizer")  # a run from before runs kept their tokenizer: one line with the fix
    with pytest.raises(BadInput, match=r"trained with is unknown: .* no data.tokenizer .*\(fix: pass --tokenizer PATH"):
        export_checkpoint(run, tmp_path / "hf2")
    assert list(elsewhere.iterdir()) == []


def test_init_from_refuses_another_rope_base_or_norm_epsilon_up_front(tmp_path):
    """model.init_from: an HF Llama with rope_theta 5e5 / rms_norm_eps 1e-6 into a recipe with the
    defaults is one line naming the key to set (before any data), and loads once the recipe agrees."""
    from omegaconf import OmegaConf

    from megadoc_pl.recipes import load_recipe, validate_recipe
    from megadoc_pl.train.module import MegadocLM

    hf_dir = export_hf(_model(rope_theta=5e5, norm_eps=1e-6), tmp_path / "hf")
    base = [f"model.init_from={hf_dir}", "model.size=nano", f"model.vocab_size={VOCAB}",
            "model.attention_backend=sdpa", "data.seq_len=64"]
    with pytest.raises(ValueError, match=r"rope_theta=500000.0 but the recipe's model has rope_theta=10000.0 "
                                         r"\(fix: set model.rope_theta=500000.0\)"):
        validate_recipe(load_recipe("baseline_real", base))
    with pytest.raises(ValueError, match=r"norm_eps=1e-06 .* \(fix: set model.overrides.norm_eps=1e-06\)"):
        validate_recipe(load_recipe("baseline_real", base + ["model.rope_theta=5e5"]))
    with pytest.raises(ValueError, match=r"d_model=64 but the recipe's model has d_model=128"):
        validate_recipe(load_recipe("baseline_real", base + ["model.size=tiny"]))
    good = load_recipe("baseline_real", base + ["model.rope_theta=5e5", "model.overrides={norm_eps: 1e-6}"])
    validate_recipe(good)
    lm = MegadocLM(OmegaConf.to_container(good, resolve=True)).eval()
    ids = _ids()
    with torch.no_grad():
        ours = lm.model.logits(lm.model(ids))
    assert torch.allclose(ours, _hf_logits(hf_dir, ids), atol=1e-4)
