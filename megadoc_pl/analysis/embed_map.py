"""Embedding map of real vs synthetic documents (MAGA Fig. 5 = v2 Fig. 2) and a shift number.

Every document of every set is embedded by one model: the mean of its final hidden states over
its non-pad tokens, L2-normalised. The model is this project's Llama from a Lightning checkpoint
or run directory (``megadoc_pl.checkpoints.load_model``, with the tokenizer the run kept) or any
local Hugging Face model directory (``AutoModel``, e.g. a bge or e5 encoder, or a
``tools/export_hf.py`` export, which embeds exactly as its checkpoint).
A causal LM's prepended BOS is left out of the mean: its state is the same for every document. All embeddings are projected together: PCA to at
most 50 dimensions, then scikit-learn's t-SNE (PCA init, fixed seed).

The shift number of a synthetic set S against the real set R is measured in the embedding space,
not in the 2-D map (t-SNE distances are not meaningful)::

    shift(S) = mean_{s in S} min_{r in R} |e_s - e_r|  /  mean_{r in R} min_{r' in R, r' != r} |e_r - e_r'|

A set drawn from the same distribution as R scores about 1; copies of real documents score 0;
larger is further away. Dividing by R's own nearest-neighbour spacing makes it comparable across
embedding models. ``reverse`` is the same with the roles swapped (mean distance from each real
document to its nearest synthetic one, same denominator): large when the synthetic set leaves
regions of the real data uncovered. Both depend on sample sizes, so compare sets of equal size.

Sampling is a pure function of (seed, document id): a set keeps the ``sample`` documents with
the smallest ``stable_hash(f"{seed}:{id}")``, independent of file order.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from megadoc_pl.errors import BadInput
from megadoc_pl.utils import atomic_write_json, atomic_write_text, require, stable_hash

REAL = "real"
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
PCA_DIMS = 50


# --------------------------------------------------------------------------- document sets


@dataclass
class DocSet:
    """The sampled documents of one labelled set: ids plus texts (files) or token ids (stores)."""

    name: str
    ids: list[str]
    texts: Optional[list[str]] = None
    tokens: Optional[list[np.ndarray]] = None  # content tokens (no BOS/EOS) of a token store
    tokenizer_fingerprint: Optional[str] = None  # of the store's tokenizer

    def __len__(self) -> int:
        return len(self.ids)


def parse_set_spec(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` -> (NAME, PATH), with a one-line error for a bad label."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"--synthetic {spec!r}: expected NAME=PATH (fix: e.g. --synthetic maga=gens/maga/)")
    if not SET_NAME.match(name) or name == REAL:
        raise ValueError(f"--synthetic {spec!r}: bad label {name!r} (fix: use letters, digits, _ . + - and not '{REAL}')")
    return name, path


def group_specs(specs: Sequence[str]) -> dict[str, list[str]]:
    """Labelled paths, in first-seen label order; a repeated label adds paths to its set."""
    sets: dict[str, list[str]] = {}
    for spec in specs:
        name, path = parse_set_spec(spec)
        sets.setdefault(name, []).append(path)
    return sets


def _sample_key(seed: int, doc_id: str) -> int:
    return stable_hash(f"{seed}:{doc_id}")


def sample_smallest(items: Iterable[tuple[str, object]], k: Optional[int], seed: int) -> list[tuple[str, object]]:
    """The ``k`` (id, payload) items with the smallest sample key (all when k is None), in key order."""
    keyed = ((_sample_key(seed, i), i, p) for i, p in items)
    chosen = list(keyed) if k is None else heapq.nsmallest(k, keyed, key=lambda t: (t[0], t[1]))
    return [(i, p) for _, i, p in sorted(chosen, key=lambda t: (t[0], t[1]))]


def _is_store(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file() and (Path(path) / "tokens.bin").is_file()


def _store_items(path: str):
    """(id, row) items of a token store, and the store."""
    from megadoc_pl.data.readers import REAL_TASK
    from megadoc_pl.data.store import TokenStore

    store = TokenStore.open(path)

    def items() -> Iterator[tuple[str, object]]:
        for i in range(len(store)):
            doc_id = store.source_id(i)
            if store.task(i) != REAL_TASK:
                doc_id = f"{doc_id}#{store.gen_index(i)}"
            yield doc_id, i

    return items(), store


def read_set(name: str, paths: Sequence[str], synthetic: bool, sample: Optional[int], seed: int,
             text_field: str = "text", id_field: str = "id") -> DocSet:
    """Read and sample one set: document/generation files or dirs, or one token store directory.

    A generation's id is ``source_id#gen_index``. A store is used as tokenised (its tokenizer must
    be the model's); files are tokenised by the model's tokenizer.
    """
    from megadoc_pl.data.readers import iter_documents, iter_generations

    for p in paths:
        if not Path(p).exists():
            raise ValueError(f"{name}: {p}: no such file or directory (fix: check the path)")
    if any(_is_store(p) for p in paths):
        if len(paths) != 1:
            raise ValueError(f"{name}: a token store must be the set's only path (got {len(paths)} paths)")
        items, store = _store_items(paths[0])
        chosen = sample_smallest(items, sample, seed)
        if not chosen:
            raise ValueError(f"{name}: the token store {paths[0]} holds no documents")
        return DocSet(name, [i for i, _ in chosen], tokens=[np.asarray(store.content_tokens(j)) for _, j in chosen],
                      tokenizer_fingerprint=store.manifest.get("tokenizer_fingerprint"))
    if synthetic:
        rows = ((f"{g.source_id}#{g.gen_index}", g.text) for g in iter_generations(paths))
    else:
        rows = ((d.id, d.text) for d in iter_documents(paths, text_field=text_field, id_field=id_field))
    chosen = sample_smallest(rows, sample, seed)
    if not chosen:
        raise ValueError(f"{name}: no documents in {', '.join(paths)}")
    return DocSet(name, [i for i, _ in chosen], texts=[str(t) for _, t in chosen])


# --------------------------------------------------------------------------- embedding models


@dataclass
class Embedder:
    """Token ids -> final hidden states, plus how documents become ids for it."""

    name: str
    hidden: Callable  # (ids_BT LongTensor, attention_mask_BT LongTensor) -> hidden_BTD
    encode: Callable[[str], list[int]]  # text -> content ids (no specials)
    wrap: Callable[[list[int]], list[int]]  # content ids -> model input (specials added)
    skip_first: bool  # leave position 0 (a prepended BOS) out of the mean
    fingerprint: Optional[str]  # the tokenizer's (checked against token stores)
    device: str = "cpu"

    def input_ids(self, content: Sequence[int], max_tokens: int) -> list[int]:
        """The model input of one document, truncated to ``max_tokens`` including specials."""
        room = max(1, max_tokens - len(self.wrap([])))
        return self.wrap([int(t) for t in content[:room]])


def _special_affixes(hf_tok) -> tuple[list[int], list[int]]:
    """The ids a HF tokenizer puts before and after one sequence ([CLS] ... [SEP], <s> ...)."""
    plain = hf_tok.encode("a", add_special_tokens=False)
    full = hf_tok.encode("a", add_special_tokens=True)
    for i in range(len(full) - len(plain) + 1):
        if full[i: i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def load_embedder(model: str, tokenizer: Optional[str] = None, device: str = "cpu") -> Embedder:
    """A local HF model directory (``AutoModel``), or what ``megadoc_pl.checkpoints.load_model``
    takes: a checkpoint of this project (file or sharded directory) or its run directory."""
    p = Path(model)
    if not (p.is_dir() and (p / "config.json").is_file()):
        import torch

        from megadoc_pl.checkpoints import load_model
        from megadoc_pl.data.tokenizer import load_tokenizer

        loaded = load_model(p, device=device, dtype=torch.float32)
        llama = loaded.model
        tok = load_tokenizer(tokenizer or loaded.require_tokenizer())
        tok.require_special(True, False)
        if tok.vocab_size > llama.cfg.vocab_size:
            raise BadInput(f"{tok.path}: tokenizer has {tok.vocab_size} ids but the model only {llama.cfg.vocab_size} "
                           f"(fix: pass the tokenizer the model was trained with)")
        # Right padding under a causal mask: no real token ever attends to a pad.
        return Embedder(p.name, hidden=lambda ids, mask: llama(ids), encode=tok.encode,
                        wrap=lambda ids: [tok.bos_id] + ids, skip_first=True, fingerprint=tok.fingerprint, device=device)
    from transformers import AutoModel, AutoTokenizer

    from megadoc_pl.data.tokenizer import fingerprint_json

    try:
        net = AutoModel.from_pretrained(str(p), local_files_only=True).to(device).float().eval()
        hf_tok = AutoTokenizer.from_pretrained(str(tokenizer or p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BadInput(f"{p}: transformers cannot load it ({str(e).splitlines()[0]}) "
                       "(fix: pass a model directory that AutoModel loads, or a megadoc_pl checkpoint)") from None

    def hidden(ids, mask):
        return net(input_ids=ids, attention_mask=mask).last_hidden_state

    prefix, suffix = _special_affixes(hf_tok)
    bos = hf_tok.bos_token_id
    if bos is not None and (prefix[:1] != [bos]):
        prefix = [bos] + prefix  # a causal LM's tokenizer without a post-processor adds nothing

    def wrap(ids: list[int]) -> list[int]:
        return prefix + ids + suffix

    backend = getattr(hf_tok, "backend_tokenizer", None)
    causal = any(a.endswith("ForCausalLM") for a in (net.config.architectures or []))
    return Embedder(p.name, hidden=hidden, encode=lambda t: hf_tok.encode(t, add_special_tokens=False), wrap=wrap,
                    skip_first=causal and hf_tok.bos_token_id is not None,
                    fingerprint=fingerprint_json(backend.to_str()) if backend else None, device=device)


def embed_set(embedder: Embedder, docs: DocSet, max_tokens: int = 512, batch_size: int = 16,
              progress: bool = True) -> np.ndarray:
    """(N, D) float64 L2-normalised mean-pooled hidden states of a set's documents."""
    import torch
    from tqdm import tqdm

    if docs.tokens is not None:
        if embedder.fingerprint and docs.tokenizer_fingerprint and embedder.fingerprint != docs.tokenizer_fingerprint:
            raise ValueError(f"{docs.name}: the token store was built with another tokenizer than the model's "
                             f"(fix: pass the document files instead, or the store's tokenizer with --tokenizer)")
        inputs = [embedder.input_ids(t, max_tokens) for t in docs.tokens]
    else:
        assert docs.texts is not None
        inputs = [embedder.input_ids(embedder.encode(t), max_tokens) for t in docs.texts]
    first = 1 if embedder.skip_first else 0
    if any(len(x) <= first for x in inputs):
        empty = docs.ids[next(i for i, x in enumerate(inputs) if len(x) <= first)]
        raise ValueError(f"{docs.name}: document {empty!r} has no tokens")
    # Longest first so each batch pads little; results go back to their own rows.
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), i))
    out: Optional[np.ndarray] = None
    bar = tqdm(total=len(inputs), desc=f"embedding {docs.name}", unit="doc", disable=not progress)
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            rows = order[lo: lo + batch_size]
            T = max(len(inputs[i]) for i in rows)
            ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
            mask_BT = torch.zeros(len(rows), T, dtype=torch.long)
            for b, i in enumerate(rows):
                ids_BT[b, : len(inputs[i])] = torch.tensor(inputs[i])
                mask_BT[b, : len(inputs[i])] = 1
            hidden_BTD = embedder.hidden(ids_BT.to(embedder.device), mask_BT.to(embedder.device)).float()
            pool_BT = mask_BT.clone()
            pool_BT[:, :first] = 0
            pool_BT1 = pool_BT.to(hidden_BTD.device, hidden_BTD.dtype)[:, :, None]
            mean_BD = (hidden_BTD * pool_BT1).sum(1) / pool_BT1.sum(1)
            vecs = mean_BD.double().cpu().numpy()
            if out is None:
                out = np.zeros((len(inputs), vecs.shape[1]))
            out[rows] = vecs
            bar.update(len(rows))
    bar.close()
    assert out is not None
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


# --------------------------------------------------------------------------- shift numbers


def nearest_distances(query: np.ndarray, ref: np.ndarray, exclude_self: bool = False, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each query row to its nearest ``ref`` row (itself excluded when
    ``exclude_self``: query and ref are then the same array)."""
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if exclude_self:
        assert q.shape == r.shape
        if len(r) < 2:
            raise ValueError("need at least two real documents for a nearest-neighbour distance")
    r2 = (r * r).sum(1)
    out = np.empty(len(q))
    for lo in range(0, len(q), chunk):
        qc = q[lo: lo + chunk]
        d2 = (qc * qc).sum(1)[:, None] + r2[None, :] - 2.0 * qc @ r.T
        if exclude_self:
            d2[np.arange(len(qc)), np.arange(lo, lo + len(qc))] = np.inf
        out[lo: lo + len(qc)] = np.sqrt(np.maximum(d2.min(1), 0.0))
    return out


def shift_stats(real: np.ndarray, synthetic: np.ndarray) -> dict:
    """The normalised nearest-neighbour shift of ``synthetic`` against ``real`` (module docstring)."""
    real_nn = float(nearest_distances(real, real, exclude_self=True).mean())
    if not real_nn > 0:
        raise ValueError("every real document has an identical twin in the sample: the shift is undefined")
    to_real = float(nearest_distances(synthetic, real).mean())
    to_synth = float(nearest_distances(real, synthetic).mean())
    return {"documents": int(len(synthetic)), "shift": to_real / real_nn, "reverse": to_synth / real_nn,
            "mean_nn_distance_to_real": to_real, "mean_nn_distance_from_real": to_synth,
            "real_nn_distance": real_nn}


# --------------------------------------------------------------------------- t-SNE


def tsne_2d(embeddings: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> tuple[np.ndarray, dict]:
    """Joint 2-D t-SNE coordinates (PCA to <= 50 dims first) and the settings used.

    The perplexity is capped at (n - 1) / 3 so small samples still work.
    """
    decomposition = require("sklearn.decomposition", "analysis", "the embedding map (t-SNE)")
    manifold = require("sklearn.manifold", "analysis", "the embedding map (t-SNE)")
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    x = np.asarray(embeddings, dtype=np.float64)
    n = len(x)
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 documents in all (got {n}) (fix: raise --sample)")
    used = float(min(perplexity, (n - 1) / 3))
    dims = min(PCA_DIMS, n, x.shape[1])
    pca_dims = dims if dims < x.shape[1] else None
    # One BLAS/OpenMP thread: the same bytes on every run, whatever the machine's core count.
    with threadpool_limits(1):
        if pca_dims:
            x = decomposition.PCA(n_components=pca_dims, svd_solver="full", random_state=seed).fit_transform(x)
        xy = manifold.TSNE(n_components=2, perplexity=used, init="pca", random_state=seed,
                           n_jobs=1).fit_transform(x)
    return xy, {"perplexity": used, "pca_dims": pca_dims, "init": "pca"}


# --------------------------------------------------------------------------- outputs


def coordinates_csv(sets: Sequence[DocSet], xy: np.ndarray) -> str:
    """``set,id,x,y`` rows in set order (real first), coordinates to 5 decimals."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["set", "id", "x", "y"])
    row = 0
    for s in sets:
        for doc_id in s.ids:
            w.writerow([s.name, doc_id, f"{xy[row, 0]:.5f}", f"{xy[row, 1]:.5f}"])
            row += 1
    assert row == len(xy)
    return buf.getvalue()


def plot_embedding_map(xy_by_set: dict[str, np.ndarray], shifts: dict[str, float], path: str | Path,
                       title: str = "") -> Path:
    """One panel per synthetic set: its documents (colour) over the real ones (grey), same axes."""
    from megadoc_pl.analysis.plots import _figure, _save

    real = xy_by_set[REAL]
    names = [k for k in xy_by_set if k != REAL]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(4.0 * cols, 4.0 * rows + (0.3 if title else 0))
    allxy = np.concatenate(list(xy_by_set.values()))
    pad = 0.03 * (allxy.max(0) - allxy.min(0) + 1e-9)
    lo, hi = allxy.min(0) - pad, allxy.max(0) + pad
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.scatter(real[:, 0], real[:, 1], s=7, c="0.55", alpha=0.6, lw=0, label=f"{REAL} ({len(real)})")
        pts = xy_by_set[name]
        ax.scatter(pts[:, 0], pts[:, 1], s=9, color=f"C{i % 10}", alpha=0.8, lw=0, label=f"{name} ({len(pts)})")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name} vs {REAL}: shift {shifts[name]:.2f}", fontsize=10)
        ax.legend(loc="lower right", fontsize=7, markerscale=2, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def summary_lines(report: dict) -> list[str]:
    """The shift table: one row per synthetic set."""
    lines = [f"{'set':<16} {'docs':>6} {'shift':>8} {'reverse':>8}",
             f"{REAL:<16} {report['real']['documents']:>6} {1.0:>8.3f} {1.0:>8.3f}  (nn distance {report['real']['nn_distance']:.4g})"]
    for name, s in report["sets"].items():
        lines.append(f"{name:<16} {s['documents']:>6} {s['shift']:>8.3f} {s['reverse']:>8.3f}")
    return lines


def embed_map(model: str, real: Sequence[str], synthetic: dict[str, list[str]], out: str | Path,
              tokenizer: Optional[str] = None, sample: Optional[int] = 1000, max_tokens: int = 512,
              batch_size: int = 16, seed: int = 0, perplexity: float = 30.0, device: str = "cpu",
              text_field: str = "text", id_field: str = "id", progress: bool = True) -> dict:
    """Sample, embed, project; write ``embed_map.png``, ``embed_map.csv``, ``shift.json`` under ``out``.

    Returns the report (also ``shift.json``) with the written paths under ``"files"``.
    """
    if not synthetic:
        raise ValueError("no synthetic set given (fix: pass --synthetic NAME=PATH at least once)")
    if sample is not None and sample < 1:
        raise ValueError(f"--sample {sample}: must be >= 1 (or 0 for every document)")
    sets = [read_set(REAL, list(real), False, sample, seed, text_field, id_field)]
    sets += [read_set(name, paths, True, sample, seed) for name, paths in synthetic.items()]
    embedder = load_embedder(model, tokenizer, device)
    emb = {s.name: embed_set(embedder, s, max_tokens, batch_size, progress) for s in sets}
    xy, tsne = tsne_2d(np.concatenate([emb[s.name] for s in sets]), seed, perplexity)
    bounds = np.cumsum([0] + [len(s) for s in sets])
    xy_by_set = {s.name: xy[bounds[i]: bounds[i + 1]] for i, s in enumerate(sets)}
    stats = {name: shift_stats(emb[REAL], emb[name]) for name in synthetic}
    report = {
        "definition": "shift = mean over synthetic docs of the distance to the nearest real doc / mean over real "
                      "docs of the distance to the nearest other real doc (L2-normalised mean-pooled hidden "
                      "states); reverse = same from real to synthetic. ~1: same distribution, 0: copies.",
        "model": str(model), "inputs": {REAL: list(real), **synthetic}, "max_tokens": max_tokens,
        "seed": seed, "sample": sample, "tsne": tsne,
        "real": {"documents": len(sets[0]), "nn_distance": stats[next(iter(stats))]["real_nn_distance"]},
        "sets": stats,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "embed_map.csv", coordinates_csv(sets, xy))
    plot_embedding_map(xy_by_set, {k: v["shift"] for k, v in stats.items()}, out / "embed_map.png",
                       title=f"t-SNE of mean-pooled hidden states ({embedder.name})")
    atomic_write_json(out / "shift.json", report)
    report["files"] = [str(out / n) for n in ("embed_map.png", "embed_map.csv", "shift.json")]
    return report
