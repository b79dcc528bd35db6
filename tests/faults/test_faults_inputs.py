"""Inputs as a new user gives them (issue 15): the released MAGACorpus files as the only input,
dump_windows past the plan, damaged token stores."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from megadoc_pl.data.prepare import prepare_corpus
from megadoc_pl.data.readers import BadRowError, iter_documents
from megadoc_pl.recipes import load_recipe

from helpers import load_script
from helpers import tiny_overrides, write_corpus

_GENRES = ["textbook", "dialogue", "blog", "lecture", "quiz"]


def maga_rows(num_docs: int = 24, reformulations: int = 5, seed: int = 0) -> list[dict]:
    """Rows in the released MAGACorpus schema: one per reformulation, each repeating its chunk's raw text."""
    rng = random.Random(seed)
    rows = []
    for d in range(num_docs):
        for chunk in range(1 + d % 2):
            raw = " ".join(f"Fact {rng.randint(0, 999)} about place {d} and part {chunk}." for _ in range(rng.randint(3, 12)))
            for k in range(reformulations):
                rows.append({
                    "meta": {"docid": f"<urn:uuid:{d:04d}>", "chunk_id": str(chunk), "raw_text": raw,
                             "genre": _GENRES[k % 5], "audience": f"audience {k}", "source": "fineweb-edu-dedup"},
                    "content_split": f"As a {_GENRES[k % 5]}: {raw.lower()}",
                })
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_maga_rows_read_as_their_source_documents_once_per_chunk(tmp_path):
    rows = maga_rows(num_docs=3, reformulations=4)
    path = _write_jsonl(tmp_path / "maga.jsonl", rows)
    counts: dict = {}
    docs = list(iter_documents(path, counts=counts))
    assert [d.id for d in docs] == ["<urn:uuid:0000>#0", "<urn:uuid:0001>#0", "<urn:uuid:0001>#1", "<urn:uuid:0002>#0"]
    assert docs[2].text == rows[8]["meta"]["raw_text"] and docs[2].meta["chunk_id"] == "1"
    assert counts["maga_rows_folded"] == len(rows) - 4 and counts["rows"] == 4
    rows[5]["meta"]["raw_text"] = "another text under the same docid#chunk_id"
    with pytest.raises(BadRowError, match=r"maga.jsonl:6: duplicate id '<urn:uuid:0001>#0' \(first at .*:5\)"):
        list(iter_documents(_write_jsonl(tmp_path / "maga.jsonl", rows)))


@pytest.mark.parametrize("method", ["maga", "maga_stitch"])
def test_maga_recipes_run_on_the_released_files_alone(tmp_path, tiny_tokenizer_path, method):
    rows = maga_rows()
    path = _write_jsonl(tmp_path / "maga.jsonl", rows)
    over = tiny_overrides(path, tiny_tokenizer_path, tmp_path, method) + [f"data.synthetic={path}"]
    # the release has reformulations of every chunk, held-out ones included: one key says to drop those
    with pytest.raises(ValueError, match="data.drop_heldout_generations=true"):
        prepare_corpus(load_recipe(method, over))
    p = prepare_corpus(load_recipe(method, over + ["data.drop_heldout_generations=true"]))
    chunks = {f"{r['meta']['docid']}#{r['meta']['chunk_id']}" for r in rows}
    assert set(p.real.source_ids) == chunks and p.real.num_documents == len(chunks)
    assert set(p.synthetic.source_ids) == chunks and p.synthetic.num_documents == len(rows)
    assert p.heldout and p.heldout <= chunks
    assert p.synthetic_units.num_units > 0 and p.plan.steps > 0
    w = p.train_windows()
    assert w.tokens([0, 1]).shape == (2, 33)


def test_dump_windows_says_when_it_truncates(tmp_path, tiny_tokenizer_path, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=60)
    over = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "dump")
    dump = load_script("tools/dump_windows.py")
    total = prepare_corpus(load_recipe("baseline_real", over)).windows("val/iid").__len__()
    capsys.readouterr()
    out = tmp_path / "w.jsonl"
    assert dump.main(["--recipe", "baseline_real", *over, "--split", "val/iid", "--start", "1",
                      "--count", str(total + 5), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert len(out.read_text().splitlines()) == total - 1
    assert (f"note: --count {total + 5} from --start 1 goes past the {total} windows of val/iid: "
            f"wrote {total - 1}") in err
    assert dump.main(["--recipe", "baseline_real", *over, "--split", "val/iid", "--start", str(total),
                      "--out", str(out)]) == 2
    assert f"error: --start {total} is past the last window of val/iid ({total} windows)" in capsys.readouterr().err


# ------------------------------------------------------------------------- damaged token stores


@pytest.fixture
def store_dir(tmp_path, tiny_tokenizer_path):
    from megadoc_pl.data.store_build import build_store

    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=200)
    return build_store([corpus], tiny_tokenizer_path, tmp_path / "store", progress=False).path


def test_overwritten_tokens_are_caught_on_open_and_by_verify(store_dir, capsys):
    from megadoc_pl.data.store import TokenStore

    prepare_tool = load_script("tools/prepare.py")
    assert prepare_tool.main(["--verify", str(store_dir)]) == 0
    tokens = store_dir / "tokens.bin"
    st = tokens.stat()
    with open(tokens, "r+b") as f:  # 1 KB of other tokens in the middle: sizes and header stay valid
        f.seek(st.st_size // 2)
        f.write(bytes(1024))
    msg = (f"{tokens}: block 0 (bytes 0..16777215) differs from the checksum in manifest.json: the file changed "
           "after the store was built (fix: rebuild the store: data.rebuild=true, or tools/prepare.py --rebuild)")
    with pytest.raises(ValueError) as e:
        TokenStore.open(store_dir)
    assert str(e.value) == msg
    os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns))  # a damage that kept the mtime: only verify sees it
    store = TokenStore.open(store_dir)
    with pytest.raises(ValueError, match="block 0 .* differs from the checksum"):
        store.verify()
    capsys.readouterr()
    assert prepare_tool.main(["--verify", str(store_dir)]) == 2
    assert capsys.readouterr().err == f"error: {msg}\n"


@pytest.mark.parametrize("damage", ["truncated index.parquet", "missing offsets.npy"])
def test_a_damaged_cached_store_is_one_line_naming_the_file(tmp_path, tiny_tokenizer_path, capsys, damage):
    from megadoc_pl.train.cli import main

    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=60)
    over = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "damaged")
    store = prepare_corpus(load_recipe("baseline_real", over)).real.path
    name = damage.split()[1]
    if damage.startswith("truncated"):
        data = (store / name).read_bytes()
        (store / name).write_bytes(data[: len(data) // 2])
    else:
        (store / name).unlink()
    capsys.readouterr()
    assert main(["fit", "--recipe", "baseline_real", *[a for o in over for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {store / name}: "), err
    assert lines[0].endswith("(fix: rebuild the store: data.rebuild=true, or tools/prepare.py --rebuild)")
    assert not (tmp_path / "runs" / "damaged").exists()
    again = prepare_corpus(load_recipe("baseline_real", over + ["data.rebuild=true"]))  # the fix it names works
    assert again.real.path == store and again.real.verify() > 0


# ------------------------------------------------------------------------- stretch split points


def _rationale_store(tmp_path, tiny_tokenizer_path, offset_shift: int = 0, fingerprint: str | None = None):
    from megadoc_pl.data.segments import equal_token_split
    from megadoc_pl.data.store_build import build_store
    from megadoc_pl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_path)
    unit = f"tokens:{(fingerprint or tok.fingerprint)[:16]}"
    docs = [{"id": f"d{i}", "text": f"Alice founded the town of Brindle in 18{i}0 and built its first mill. " * 3}
            for i in range(4)]
    gens = []
    for d in docs:
        cuts = equal_token_split(len(tok.encode(d["text"])), 2)
        for i, cut in enumerate(cuts):
            gens.append({"source_id": d["id"], "task": "rationale", "gen_index": i, "split_index": i,
                         "split_token_offset": cut + offset_shift, "split_tokenizer": unit,
                         "text": f"Why part {i} leads on."})
    tag = f"{offset_shift}-{fingerprint}"
    real = build_store(_write_jsonl(tmp_path / "real.jsonl", docs), tiny_tokenizer_path, tmp_path / "real",
                       progress=False)
    synth = build_store(_write_jsonl(tmp_path / f"gen{tag}.jsonl", gens), tiny_tokenizer_path, tmp_path / f"gen{tag}",
                        kind="generations", progress=False)
    return real, synth


def test_stretch_refuses_rationales_made_for_other_split_points(tmp_path, tiny_tokenizer_path):
    from megadoc_pl.data.views import ViewOptions, build_view

    from megadoc_pl.data.tokenizer import load_tokenizer

    encode = load_tokenizer(tiny_tokenizer_path).encode
    opts = ViewOptions(view="stretch", generations=2)
    real, good = _rationale_store(tmp_path, tiny_tokenizer_path)
    assert build_view(real, good, opts, encode=encode).num_units == 4
    _, shifted = _rationale_store(tmp_path, tiny_tokenizer_path, offset_shift=3)
    with pytest.raises(ValueError) as e:
        build_view(real, shifted, opts, encode=encode)
    msg = str(e.value)
    assert msg.startswith("source 'd0': rationale 0 was generated for the split at token ") and "\n" not in msg
    assert "fix: regenerate the rationales with tools/synthesize.py --task rationale" in msg
    _, other = _rationale_store(tmp_path, tiny_tokenizer_path, fingerprint="f" * 64)
    with pytest.raises(ValueError, match=r"\(tokens:ffffffffffffffff\) but stretch splits the training tokenization"):
        build_view(real, other, opts, encode=encode)


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from megadoc_pl.data import store_build
from megadoc_pl.data.prepare import prepare_corpus
from megadoc_pl.recipes import load_recipe

def hang(tmp, *args, **kwargs):
    (tmp / "tokens.bin").write_bytes(bytes(1 << 20))
    print("building", flush=True)
    time.sleep(300)

store_build._write_store = hang
prepare_corpus(load_recipe("baseline_real", sys.argv[1:]))
"""


def test_a_preparation_killed_mid_build_leaves_nothing_after_the_next_start(tmp_path, tiny_tokenizer_path, capsys):
    import signal
    import subprocess
    import sys

    from helpers import REPO

    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=60)
    over = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "killed")
    builder = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, *over], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert builder.stdout.readline().strip() == "building"
    builder.send_signal(signal.SIGKILL)
    builder.wait()
    partial = list((tmp_path / "cache" / "stores").glob(".*.partial"))
    assert len(partial) == 1 and (partial[0] / "tokens.bin").stat().st_size == 1 << 20
    capsys.readouterr()
    p = prepare_corpus(load_recipe("baseline_real", over))  # the kernel released the dead builder's lock
    assert f"removed {partial[0]}, left by an interrupted preparation" in capsys.readouterr().err
    assert [d.name for d in (tmp_path / "cache" / "stores").iterdir()] == [p.real.path.name]


# ------------------------------------------------------------------------- refused before any data work


@pytest.mark.parametrize("sets, message", [
    (["model.attention_backend=flash_attn", "train.accelerator=cpu"],
     "model.attention_backend=flash_attn needs a CUDA GPU but train.accelerator=cpu (fix: set "
     "model.attention_backend=sdpa or flex to train on the CPU, or train on a GPU with train.accelerator=gpu)"),
    (["model.attention_backend=torch_varlen", "train.accelerator=cpu"],
     "model.attention_backend=torch_varlen needs a CUDA GPU but train.accelerator=cpu (fix: set "
     "model.attention_backend=sdpa or flex to train on the CPU, or train on a GPU with train.accelerator=gpu)"),
    (["model.attention_backend=flash_attn", "train.accelerator=gpu", "train.precision=32-true"],
     "model.attention_backend=flash_attn needs bf16/fp16 activations but train.precision=32-true (fix: set "
     "train.precision=bf16-mixed, or model.attention_backend=sdpa or flex for full precision)"),
], ids=["flash_attn-cpu", "torch_varlen-cpu", "flash_attn-32-true"])
def test_a_gpu_only_attention_backend_is_refused_before_preparation(tmp_path, tiny_tokenizer_path, capsys, sets,
                                                                    message):
    from megadoc_pl.train.cli import main

    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=60)
    over = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "gpu-only") + sets
    capsys.readouterr()
    assert main(["fit", "--recipe", "baseline_real", *[a for o in over for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # nothing prepared or claimed


def test_gpu_only_attention_backends_pass_where_they_can_run(tmp_path, tiny_tokenizer_path):
    from megadoc_pl.recipes import validate_recipe

    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=8)
    base = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "ok")
    for sets in (["model.attention_backend=flash_attn", "train.accelerator=gpu"],
                 ["model.attention_backend=torch_varlen", "train.accelerator=auto", "train.precision=bf16-mixed"],
                 ["model.attention_backend=sdpa", "train.accelerator=cpu"],
                 ["model.attention_backend=auto", "train.accelerator=cpu", "train.precision=32-true"]):
        validate_recipe(load_recipe("baseline_real", base + sets))  # auto values are the machine's to decide


# ------------------------------------------------------------------------- held-out seeds in tools/synthesize.py


def test_synthesize_says_how_many_input_documents_are_held_out(tmp_path, capsys):
    from megadoc_pl.synth.cli import main

    docs = [{"id": f"doc-{i:03d}", "text": f"Alice built the mill of Brindle in 18{i:02d}. It stood for years."}
            for i in range(10)]
    heldout = [d["id"] for d in docs[:3]]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"seed": 0, "heldout": heldout, "sets": {"iid": heldout, "long": [], "short": []}}))
    argv = ["--task", "rephrase", "--backend", "template", "--split-file", str(split), "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--input", str(_write_jsonl(tmp_path / "docs.jsonl", docs)), "--out", str(tmp_path / "a")]) == 0
    said = [ln for ln in capsys.readouterr().err.splitlines() if "held out" in ln]
    assert said == [f"[synth] skipping 3 of 10 input documents: held out for validation in {split} "
                    "(never generation seeds)"]
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["totals"]["heldout_skipped"] == 3 and stats["totals"]["rows_written"] == 7
    # nothing but held-out documents: bad input, one line, nothing written
    only = _write_jsonl(tmp_path / "only.jsonl", docs[:3])
    assert main(argv + ["--input", str(only), "--out", str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == (
        f"error: all 3 input documents are held-out validation documents in {split}; they are never used as "
        "generation seeds (fix: pass the training documents, or a split file that holds out fewer)\n")
    assert not (tmp_path / "b").exists()
