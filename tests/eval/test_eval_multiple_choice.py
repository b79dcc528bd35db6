"""Multiple-choice scoring: row formats, lm-eval tokenisation, exact log-likelihoods, acc/acc_norm
known by construction, parity with the HF export (and with lm-eval-harness when installed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.eval.multiple_choice import (
    MCExample,
    MultipleChoiceScorer,
    average_error,
    bucket_length,
    bucket_lengths,
    evaluate_tasks,
    load_task,
    parse_row,
    parse_task_specs,
)
from megadoc_pl.eval.scoring import token_losses
from megadoc_pl.model.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return load_tokenizer(tiny_tokenizer_path)


def unigram_llama(scores_V: torch.Tensor) -> Llama:
    """A real Llama whose next-token logits are ``scores`` at every position, whatever the input.

    Every embedding row is the same vector and the blocks' output projections are zero, so the
    final hidden state is one constant vector h; the LM head rows are ``s_v * h / |h|^2``.
    """
    V = scores_V.numel()
    cfg = LlamaConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=32, vocab_size=V, attention_backend="sdpa")
    model = Llama(cfg).eval()
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
        for layer in model.layers:
            layer.attn.wo.weight.zero_()
            layer.mlp.w_down.weight.zero_()
        h = model(torch.zeros(1, 1, dtype=torch.long))[0, 0]
        model.lm_head.weight.copy_(scores_V[:, None].float() * h[None, :] / h.dot(h))
    return model


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------- formats


def test_row_formats_of_arc_piqa_sciq_and_canonical():
    arc = {"id": "Mercury_1", "question": "Which is a mammal?",
           "choices": {"text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"}
    assert parse_row(arc, "f:1") == MCExample("Mercury_1", "Question: Which is a mammal?\nAnswer:", ("shark", "whale", "trout"), 1)
    arc_num = dict(arc, choices={"text": ["a", "b"], "label": ["1", "2"]}, answerKey="2")
    assert parse_row(arc_num, "f:1").label == 1
    piqa = {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid", "label": 0}
    assert parse_row(piqa, "f:2") == MCExample("f:2", "Question: Open a jar\nAnswer:", ("twist the lid", "eat the lid"), 0)
    sciq = {"question": "What gas do plants absorb?", "distractor1": "oxygen", "distractor2": "helium",
            "distractor3": "neon", "correct_answer": "carbon dioxide", "support": "  Plants use CO2."}
    ex = parse_row(sciq, "f:3")
    assert ex.context == "Plants use CO2.\nQuestion: What gas do plants absorb?\nAnswer:"
    assert ex.choices == ("oxygen", "helium", "neon", "carbon dioxide") and ex.label == 3
    assert parse_row({"id": 7, "context": "2+2 =", "choices": ["4", "5"], "label": 0}, "f:4").context == "2+2 ="
    assert parse_row({"question": "Sky?", "choices": ["blue", "red"], "answer": "0"}, "f:5").context == "Question: Sky?\nAnswer:"


@pytest.mark.parametrize("row,match", [
    ({"context": "x", "choices": ["a", "b"], "label": 2}, "label 2 is not an index"),
    ({"context": "x", "choices": ["a"], "label": 0}, "at least two string choices"),
    ({"text": "no choices"}, "unrecognised row"),
    ({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}, "answerKey 'E'"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, match):
    path = write_jsonl(tmp_path / "t.jsonl", [{"context": "ok", "choices": ["a", "b"], "label": 0}, row])
    with pytest.raises(ValueError, match=match) as e:
        load_task(path)
    assert str(e.value).startswith(f"{path}:2: ")


def test_task_file_and_spec_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: invalid JSON"):
        load_task(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no such multiple-choice task file"):
        load_task(tmp_path / "missing.jsonl")
    assert parse_task_specs(["arc_easy=a.jsonl", "piqa=dir/p=q.jsonl"]) == {"arc_easy": "a.jsonl", "piqa": "dir/p=q.jsonl"}
    with pytest.raises(ValueError, match="name=path.jsonl"):
        parse_task_specs(["arc_easy"])


# ---------------------------------------------------------------------------------- tokenisation


def test_encode_pair_follows_lm_eval_and_starts_with_bos(tok):
    scorer = MultipleChoiceScorer(tok, add_bos=True)
    ctx, cont = scorer.encode_pair("Question: which?\nAnswer:", " the fox")
    assert ctx == [tok.bos_id] + tok.encode("Question: which?\nAnswer:")
    assert ctx + cont == [tok.bos_id] + tok.encode("Question: which?\nAnswer: the fox")
    # a trailing space in the context moves to the continuation
    assert scorer.encode_pair("Answer: ", "fox") == scorer.encode_pair("Answer:", " fox")
    # empty context: the continuation is conditioned on BOS alone
    assert scorer.encode_pair("", " fox") == ([tok.bos_id], tok.encode(" fox"))
    no_bos = MultipleChoiceScorer(tok, add_bos=False)
    assert no_bos.encode_pair("Answer:", " fox")[0] == tok.encode("Answer:")
    assert no_bos.encode_pair("", " fox")[0] == [tok.eos_id]


# ---------------------------------------------------------------------------------- scoring


def test_loglikelihoods_are_exact_under_a_uniform_model_and_acc_norm_differs(tok):
    V = tok.vocab_size
    model = unigram_llama(torch.zeros(V))  # uniform: every token costs exactly log V
    scorer = MultipleChoiceScorer(tok, add_bos=True, max_length=64, batch_size=3)
    long_right = "the quick brown fox jumps"
    examples = [MCExample(f"q{i}", f"Question {i}: pick one\nAnswer:", ("x", long_right), 1) for i in range(3)]
    scores = scorer.score_examples(model, examples)
    for s in scores:
        n_short, n_long = len(tok.encode(" x")), len(tok.encode(" " + long_right))
        assert s.loglikelihoods == pytest.approx([-n_short * math.log(V), -n_long * math.log(V)], rel=1e-5)
        # by construction: the short choice has the larger sum, the long one the larger per-character mean
        assert n_short < n_long and n_short / 1 > n_long / len(long_right)
        assert (s.pred, s.pred_norm) == (0, 1)
    metrics, results = evaluate_tasks(model, {"toy": examples}, scorer)
    assert metrics == {"downstream/toy/acc": 0.0, "downstream/toy/acc_norm": 1.0, "downstream/avg_error": 1.0}
    assert results["toy"].n == 3


def test_accuracy_known_by_construction_with_a_model_that_prefers_the_right_tokens(tok, tmp_path):
    right = ["bead", "cab", "dace", "aced"]
    wrong = ["stormy", "twist", "rusty", "wry"]
    ids = lambda words: {i for w in words for i in tok.encode(" " + w)}
    boost, penal = ids(right) - ids(wrong), ids(wrong) - ids(right)
    scores = torch.zeros(tok.vocab_size)
    scores[sorted(boost)] = 10.0
    scores[sorted(penal)] = -10.0
    model = unigram_llama(scores)
    # rows 0-2 label the preferred answer; row 3 deliberately labels a distractor
    rows = [{"id": f"r{i}", "context": f"Pick {i}:", "choices": [wrong[i], right[i], wrong[(i + 1) % 4]], "label": 1}
            for i in range(3)]
    rows.append({"id": "r3", "context": "Pick 3:", "choices": [right[3], wrong[3]], "label": 1})
    task = load_task(write_jsonl(tmp_path / "toy.jsonl", rows))
    scorer = MultipleChoiceScorer(tok, add_bos=True, max_length=32, batch_size=4)

    # oracle log-likelihoods: the model's (constant) next-token log-probs summed over the tokens
    with torch.no_grad():
        logp_V = torch.log_softmax(model.logits(model(torch.zeros(1, 1, dtype=torch.long)))[0, 0].double(), -1)
    metrics, results = evaluate_tasks(model, {"toy": task}, scorer)
    for ex, s in zip(task, results["toy"].examples):
        expect = [float(sum(logp_V[t] for t in tok.encode(" " + c))) for c in ex.choices]
        assert s.loglikelihoods == pytest.approx(expect, rel=1e-4)
        assert ex.choices[s.pred] in right
    assert metrics["downstream/toy/acc"] == 0.75
    assert metrics["downstream/avg_error"] == 0.25


def test_average_error_is_one_minus_mean_accuracy():
    assert average_error([0.443, 0.618, 0.691]) == pytest.approx(1 - (0.443 + 0.618 + 0.691) / 3)


def test_left_truncation_keeps_the_continuation(tok):
    model = unigram_llama(torch.zeros(tok.vocab_size))
    scorer = MultipleChoiceScorer(tok, add_bos=True, max_length=8, batch_size=2)
    ll = scorer.loglikelihoods(model, [("a very long context that will not fit" * 3, " fox")])
    assert ll == pytest.approx([-len(tok.encode(" fox")) * math.log(tok.vocab_size)], rel=1e-5)
    with pytest.raises(ValueError, match="does not fit max_length"):
        scorer.loglikelihoods(model, [("ctx", " " + "the quick brown fox jumps " * 2)])


# ---------------------------------------------------------------------------------- padded shapes


class ShapeRecorder:
    """Scores with ``model`` (or zeros) and records the (B, T) of every batch it is given."""

    def __init__(self, model=None):
        self.model, self.shapes = model, []

    def token_losses(self, batch):
        self.shapes.append(tuple(batch["input_ids"].shape))
        return token_losses(self.model, batch) if self.model is not None else torch.zeros(batch["targets"].shape)


def test_bucket_lengths_are_powers_of_two_capped_at_the_context():
    assert bucket_lengths(2048) == (128, 256, 512, 1024, 2048)
    assert bucket_lengths(300) == (128, 256, 300) and bucket_lengths(64) == (64,)
    assert [bucket_length(n, 2048) for n in (1, 128, 129, 1000, 2048)] == [128, 128, 256, 1024, 2048]
    assert bucket_length(299, 300) == 300 and bucket_length(5, 64) == 64


def test_bucket_padding_keeps_the_loglikelihoods(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=tok.vocab_size,
                      attention_backend="sdpa")
    model = Llama(cfg).eval()
    pairs = [(f"Question {i}: " + "why the quick brown fox " * (i % 5), " " + "jumps " * (1 + i % 3)) for i in range(7)]
    padded, tight = ShapeRecorder(model), ShapeRecorder(model)
    ll_padded = MultipleChoiceScorer(tok, max_length=256, batch_size=3).loglikelihoods(padded, pairs)
    ll_tight = MultipleChoiceScorer(tok, max_length=256, batch_size=3, pad_to_buckets=False).loglikelihoods(tight, pairs)
    assert set(padded.shapes) == {(3, 128)} and tight.shapes[-1][0] == 1  # 7 pairs: the last batch is one row
    assert len(set(tight.shapes)) > 1
    torch.testing.assert_close(torch.tensor(ll_padded), torch.tensor(ll_tight), rtol=1e-6, atol=1e-5)


def test_padded_shapes_over_a_realistic_spread_are_few(tok):
    # ARC/PIQA/SciQ-like: ~20 to ~600 tokens of context (short questions to SciQ's support
    # paragraphs; the tiny tokenizer spends ~3-4 tokens a word), choices of a few words
    g = torch.Generator().manual_seed(0)
    words = "the a plant cell energy water light heat gas animal moves grows because which what".split()
    say = lambda n: " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g))
    pairs = []
    for n_ctx in torch.randint(4, 150, (120,), generator=g).tolist():
        context = f"{say(n_ctx)}\nQuestion: {say(12)}?\nAnswer:"
        pairs += [(context, " " + say(int(n))) for n in torch.randint(1, 12, (4,), generator=g)]
    recorder = ShapeRecorder()
    MultipleChoiceScorer(tok, max_length=2048, batch_size=16).loglikelihoods(recorder, pairs)
    rows, lengths = {b for b, _ in recorder.shapes}, {t for _, t in recorder.shapes}
    assert rows == {16} and lengths <= set(bucket_lengths(2048)) and 1 < len(lengths) <= 4
    assert len(recorder.shapes) == 30  # every pair scored once, in full batches


# ---------------------------------------------------------------------------------- HF export parity


def _hf_export(tmp_path, tiny_tokenizer_path, tok):
    from megadoc_pl.checkpoints import export_hf

    torch.manual_seed(0)
    cfg = LlamaConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, vocab_size=tok.vocab_size,
                      attention_backend="sdpa")
    model = Llama(cfg).eval()
    out = export_hf(model, tmp_path / "hf", tokenizer=tiny_tokenizer_path)
    return model, out


def _mixed_examples():
    return [
        MCExample("a", "Question: Who founded Brindle?\nAnswer:", ("Alice", "the lazy dog", "a mill"), 0),
        MCExample("b", "The quick brown", (" fox jumps", "dog", "town of Brindle"), 1),
        MCExample("c", "Rationales are inserted between", ("equal token segments", "windows"), 0),
        MCExample("d", "", ("Megadocs stitch", "A mixture"), 1),
    ]


def test_scores_equal_an_unbatched_oracle_through_the_hf_export(tmp_path, tiny_tokenizer_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, hf_dir = _hf_export(tmp_path, tiny_tokenizer_path, tok)
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    examples = _mixed_examples()
    scores = MultipleChoiceScorer(tok, add_bos=True, max_length=64, batch_size=3).score_examples(model, examples)
    for ex, s in zip(examples, scores):
        for choice, ll in zip(ex.choices, s.loglikelihoods):
            # lm-eval's recipe, written out: BOS + context, then the continuation tokens of the joint encoding
            ctx_ids = [hf_tok.bos_token_id] + hf_tok(ex.context, add_special_tokens=False)["input_ids"]
            whole = [hf_tok.bos_token_id] + hf_tok(ex.context + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx_ids):]
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(torch.tensor([whole])).logits[0].double(), -1)
            expect = sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont))
            assert ll == pytest.approx(expect, rel=1e-4, abs=1e-4)


def test_lm_eval_harness_agrees_through_the_export(tmp_path, tiny_tokenizer_path, tok):
    pytest.importorskip("lm_eval", reason="lm-eval-harness is optional (pip install 'megadoc_pl[eval]')")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (pip install 'megadoc_pl[eval]')")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, hf_dir = _hf_export(tmp_path, tiny_tokenizer_path, tok)
    examples = [e for e in _mixed_examples() if e.context]  # lm-eval's empty-context rule differs per version
    data = write_jsonl(tmp_path / "toy.jsonl", [{"context": e.context, "choices": list(e.choices), "label": e.label}
                                                for e in examples])
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "toy_mc.yaml").write_text(
        "task: toy_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},add_bos_token=True,dtype=float32",
                          tasks=["toy_mc"], task_manager=TaskManager(include_path=str(task_dir)),
                          batch_size=2, device="cpu")
    theirs = out["results"]["toy_mc"]
    ours, _ = evaluate_tasks(model, {"toy_mc": examples}, MultipleChoiceScorer(tok, add_bos=True, max_length=64))
    assert ours["downstream/toy_mc/acc"] == pytest.approx(theirs["acc,none"])
    assert ours["downstream/toy_mc/acc_norm"] == pytest.approx(theirs["acc_norm,none"])
