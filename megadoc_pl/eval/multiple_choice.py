"""Zero-shot multiple-choice scoring by log-likelihood (ARC-Easy / PIQA / SciQ shaped JSONL).

Each choice is scored as lm-eval-harness scores it: the sum of the log-probabilities of the
continuation ``" " + choice`` given the context. ``acc`` takes the argmax of that sum,
``acc_norm`` of the sum divided by the choice's length in characters (lm-eval's
``len(choice)``; bytes for ASCII). The megadocs summary is ``avg_error = 1 - mean(acc)`` over
tasks.

Row formats (one JSON object per line; the first that matches wins):

- canonical: ``{"id", "context" | "question", "choices": [str, ...], "label": int}``;
  ``context`` is used verbatim, a bare ``question`` becomes ``"Question: {q}\\nAnswer:"``;
  ``answer`` or ``gold`` may stand for ``label``.
- ARC (allenai/ai2_arc): ``{"id", "question", "choices": {"text": [...], "label": [...]},
  "answerKey"}``, prompt ``"Question: {question}\\nAnswer:"``.
- PIQA: ``{"goal", "sol1", "sol2", "label"}``, prompt ``"Question: {goal}\\nAnswer:"``.
- SciQ: ``{"question", "distractor1", "distractor2", "distractor3", "correct_answer",
  "support"}``, prompt ``"{support.lstrip()}\\nQuestion: {question}\\nAnswer:"``, choices
  ``[distractor1, distractor2, distractor3, correct_answer]`` (label 3).

These are lm-eval-harness's prompts for arc_easy, piqa and sciq, so the numbers are comparable.
BOS: when the model was trained with BOS at document starts (``data.add_bos``), every scored
sequence starts with BOS, as every training document did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from megadoc_pl.eval.scoring import IGNORE, causal_rows_batch, token_losses
from megadoc_pl.utils import iter_jsonl

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter between context and choice


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question."""

    id: str
    context: str
    choices: tuple[str, ...]
    label: int


# ---------------------------------------------------------------------------------- loading


def _qa_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def parse_row(row: Mapping[str, Any], where: str) -> MCExample:
    """One JSONL row in any accepted format -> MCExample; ``where`` is ``FILE:LINE`` for errors."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"{where}: {problem} (fix: use the canonical row "
                          '{"id", "context" or "question", "choices": [...], "label": int}, or an ARC/PIQA/SciQ row)')

    if not isinstance(row, Mapping):
        raise bad(f"row is a {type(row).__name__}, not a JSON object")
    rid = str(row.get("id", where))
    if "goal" in row and "sol1" in row and "sol2" in row:  # PIQA
        context, choices, label = _qa_prompt(row["goal"]), [row["sol1"], row["sol2"]], row.get("label")
    elif "correct_answer" in row and "distractor1" in row:  # SciQ
        support = str(row.get("support") or "").lstrip()
        context = f"{support}\nQuestion: {row.get('question', '')}\nAnswer:"
        choices = [row.get("distractor1"), row.get("distractor2"), row.get("distractor3"), row["correct_answer"]]
        label = 3
    elif isinstance(row.get("choices"), Mapping):  # ARC
        ch = row["choices"]
        if "text" not in ch or "label" not in ch or "answerKey" not in row:
            raise bad("ARC-style 'choices' needs 'text' and 'label' lists and the row an 'answerKey'")
        if row["answerKey"] not in ch["label"]:
            raise bad(f"answerKey {row['answerKey']!r} is not one of the choice labels {ch['label']}")
        context, choices, label = _qa_prompt(row.get("question", "")), list(ch["text"]), list(ch["label"]).index(row["answerKey"])
    elif isinstance(row.get("choices"), list):  # canonical
        if isinstance(row.get("context"), str):
            context = row["context"]
        elif isinstance(row.get("query"), str):
            context = row["query"]
        elif isinstance(row.get("question"), str):
            context = _qa_prompt(row["question"])
        else:
            raise bad("row has 'choices' but no 'context' or 'question' string")
        choices = row["choices"]
        label = next((row[k] for k in ("label", "answer", "gold") if k in row), None)
    else:
        raise bad("unrecognised row: no 'choices', PIQA 'goal'/'sol1'/'sol2' or SciQ 'correct_answer'")
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise bad(f"needs at least two string choices, got {choices!r}")
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise bad(f"label {label!r} is not an index into the {len(choices)} choices")
    return MCExample(id=rid, context=str(context), choices=tuple(choices), label=label)


def load_task(path: str | Path, limit: Optional[int] = None) -> list[MCExample]:
    """Read a multiple-choice JSONL file (rows in any format of the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such multiple-choice task file (fix: pass name=path.jsonl with an existing file)")
    examples: list[MCExample] = []
    for line_no, row in iter_jsonl(path):
        examples.append(parse_row(row, f"{path}:{line_no}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise ValueError(f"{path}: no examples (fix: the file must hold at least one JSONL row)")
    return examples


def parse_task_specs(specs: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``["arc_easy=path.jsonl", ...]`` (or a mapping) -> {name: path}."""
    if isinstance(specs, Mapping):
        return {str(k): str(v) for k, v in specs.items()}
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"task {spec!r} must be written name=path.jsonl (e.g. arc_easy=data/arc_easy.jsonl)")
        out[name] = path
    return out


# ---------------------------------------------------------------------------------- scoring


@dataclass
class ExampleScore:
    """Log-likelihoods of one question's choices and the resulting predictions."""

    id: str
    label: int
    loglikelihoods: list[float]
    pred: int  # argmax of the summed log-likelihood
    pred_norm: int  # argmax of log-likelihood / len(choice)


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_norm: float
    examples: list[ExampleScore] = field(default_factory=list, repr=False)


def _argmax(values: Sequence[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


MIN_BUCKET = 128  # flex attention's block size: a shorter row costs a whole block anyway


def bucket_lengths(max_length: int) -> tuple[int, ...]:
    """The padded lengths a scorer's batches take: powers of two from MIN_BUCKET, then ``max_length``."""
    out, n = [], MIN_BUCKET
    while n < max_length:
        out.append(n)
        n *= 2
    return (*out, max_length)


def bucket_length(n: int, max_length: int) -> int:
    """The smallest of :func:`bucket_lengths` that holds ``n <= max_length`` inputs."""
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


class MultipleChoiceScorer:
    """Tokenises (context, choice) pairs as lm-eval-harness does and scores them in batches.

    Every batch is padded to ``batch_size`` rows of one of a few lengths (:func:`bucket_lengths`):
    a model compiled for static shapes (compiled flex attention) then compiles once per length
    instead of once per batch, and never exhausts its recompilation limit. Padding comes after
    every real token with ``IGNORE`` targets, so causal attention keeps the scores unchanged.

    Args:
        tokenizer: ``megadoc_pl.data.tokenizer.TokenizerInfo`` (or anything with
            ``encode(text) -> list[int]``, ``bos_id``, ``eos_id``).
        add_bos: start every sequence with BOS (match the training store's ``add_bos``).
        max_length: longest input the model sees (its trained ``seq_len``); longer sequences
            lose tokens at the left, as in lm-eval.
        batch_size: sequences per forward pass.
        pad_to_buckets: pad batches to the bucket shapes; False pads each batch only to its
            longest row (fewer tokens, a new shape for almost every batch).
    """

    def __init__(self, tokenizer: Any, add_bos: bool = True, max_length: int = 4096, batch_size: int = 16,
                 pad_to_buckets: bool = True) -> None:
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        if add_bos and getattr(tokenizer, "bos_id", None) is None:
            raise ValueError("multiple-choice scoring with add_bos=True needs a tokenizer with a BOS token (fix: add_bos=False)")
        self.max_length = max_length
        self.batch_size = max(1, batch_size)
        self.pad_to_buckets = pad_to_buckets

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), splitting the joint encoding at the context's length."""
        n_space = len(context) - len(context.rstrip())
        if n_space:  # a trailing space belongs to the continuation's first token
            context, continuation = context[:-n_space], context[-n_space:] + continuation
        prefix = [self.tokenizer.bos_id] if self.add_bos else []
        ctx = prefix + (self.tokenizer.encode(context) if context else [])
        if not ctx:  # nothing to condition on: lm-eval conditions on the EOS/prefix token
            eos = getattr(self.tokenizer, "eos_id", None)
            if eos is None:
                raise ValueError("empty context without BOS or EOS token to condition on (fix: add_bos=True)")
            ctx = [eos]
        whole = prefix + self.tokenizer.encode(context + continuation) if context else ctx + self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihoods(self, model: Any, pairs: Sequence[tuple[str, str]], device: Any = None,
                       progress: Optional[str] = None) -> list[float]:
        """Summed log-probability of each continuation given its context."""
        device = torch.device(device) if device is not None else _model_device(model)
        requests = []
        for i, (context, continuation) in enumerate(pairs):
            ctx, cont = self.encode_pair(context, continuation)
            tokens = (ctx + cont)[-(self.max_length + 1):]
            if len(cont) >= len(tokens):
                raise ValueError(f"a choice of {len(cont)} tokens does not fit max_length={self.max_length} (fix: raise max_length)")
            requests.append((i, tokens, len(cont)))
        # Longest first (like lm-eval): padding is wasted only inside a batch of similar lengths.
        requests.sort(key=lambda r: (-len(r[1]), r[0]))
        out = [0.0] * len(requests)
        batches = range(0, len(requests), self.batch_size)
        for b0 in tqdm(batches, desc=progress, disable=progress is None, leave=False):
            chunk = requests[b0:b0 + self.batch_size]
            T = max(len(tokens) for _, tokens, _ in chunk) - 1
            rows = len(chunk)
            if self.pad_to_buckets:
                T, rows = bucket_length(T, self.max_length), self.batch_size
            inp = torch.zeros(rows, T, dtype=torch.long)
            tgt = torch.full((rows, T), IGNORE, dtype=torch.long)
            for row, (_, tokens, n_cont) in enumerate(chunk):
                L = len(tokens) - 1
                inp[row, :L] = torch.tensor(tokens[:-1])
                if n_cont:
                    tgt[row, L - n_cont:L] = torch.tensor(tokens[-n_cont:])
            batch = causal_rows_batch(inp.to(device), tgt.to(device))
            nll_B = token_losses(model, batch).float().sum(-1).cpu()
            for row, (i, _, _) in enumerate(chunk):
                out[i] = -float(nll_B[row])
        return out

    def score_examples(self, model: Any, examples: Sequence[MCExample], device: Any = None,
                       progress: Optional[str] = None) -> list[ExampleScore]:
        pairs, owners = [], []
        for e_idx, ex in enumerate(examples):
            for choice in ex.choices:
                pairs.append((ex.context, TARGET_DELIMITER + choice))
                owners.append(e_idx)
        lls = self.loglikelihoods(model, pairs, device=device, progress=progress)
        per_example: list[list[float]] = [[] for _ in examples]
        for e_idx, ll in zip(owners, lls):
            per_example[e_idx].append(ll)
        scores = []
        for ex, ll in zip(examples, per_example):
            normed = [v / max(len(c), 1) for v, c in zip(ll, ex.choices)]
            scores.append(ExampleScore(ex.id, ex.label, ll, _argmax(ll), _argmax(normed)))
        return scores


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------- tasks


def evaluate_tasks(
    model: Any,
    tasks: Mapping[str, Sequence[MCExample]],
    scorer: MultipleChoiceScorer,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    device: Any = None,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, TaskResult]]:
    """Score every task; returns (metrics, per-task results).

    metrics: ``downstream/<task>/acc``, ``downstream/<task>/acc_norm`` and
    ``downstream/avg_error`` (= 1 - mean acc over tasks). Under DDP each rank scores
    ``examples[rank::world_size]`` and ``reduce_sum`` adds the integer counts over ranks, so
    the result equals a single-process run. Per-example scores are kept for this rank's share.
    """
    metrics: dict[str, float] = {}
    results: dict[str, TaskResult] = {}
    for name, examples in tasks.items():
        mine = list(examples)[rank::world_size]
        scores = scorer.score_examples(model, mine, device=device, progress=f"{name}" if progress else None)
        counts = torch.tensor([sum(s.pred == s.label for s in scores), sum(s.pred_norm == s.label for s in scores),
                               len(scores)], dtype=torch.int64)
        if reduce_sum is not None:
            counts = reduce_sum(counts.to(_model_device(model))).cpu()
        correct, correct_norm, n = (int(v) for v in counts)
        acc = correct / n if n else math.nan
        acc_norm = correct_norm / n if n else math.nan
        results[name] = TaskResult(name, n, acc, acc_norm, scores)
        metrics[f"downstream/{name}/acc"] = acc
        metrics[f"downstream/{name}/acc_norm"] = acc_norm
    if results:
        metrics["downstream/avg_error"] = average_error([r.acc for r in results.values()])
    return metrics, results


def average_error(accuracies: Sequence[float]) -> float:
    """The megadocs benchmark summary: 1 - mean accuracy over tasks (ARC-E, PIQA, SciQ)."""
    return 1.0 - sum(accuracies) / len(accuracies)
