"""Named validation losses and loss-by-position curves: oracles, DDP exactness, TensorBoard/CSV."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadoc_pl.eval.position import (
    doc_bucket_edges,
    doc_bucket_index,
    read_curves_csv,
    window_bucket_edges,
    window_bucket_index,
)
from megadoc_pl.eval.scoring import causal_rows_batch, token_losses
from megadoc_pl.eval.validation import ValidationMetrics
from megadoc_pl.model.llama import Llama

from helpers import one_thread, tiny_llama

T = 24
VOCAB = 64


def small_llama(seed: int = 0) -> Llama:
    return tiny_llama(VOCAB, seed, loss_chunk_size=7)


def make_batches(n_batches: int, B: int = 3, seed: int = 1) -> list[dict]:
    """Windows of random tokens with document positions that cross window starts."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        tokens = torch.randint(0, VOCAB, (B, T + 1), generator=g)
        batch = causal_rows_batch(tokens[:, :-1], tokens[:, 1:])
        # each row: a document that started `offset` tokens before the window, then a new one at t=10
        offset = torch.randint(0, 5000, (B, 1), generator=g)
        t = torch.arange(T)
        batch["doc_positions"] = torch.where(t < 10, offset + t, t - 10)
        out.append(batch)
    return out


def oracle_bucket(p: int, n: int) -> int:
    return min(0 if p == 0 else int(math.floor(math.log2(p))) + 1, n - 1)


# ---------------------------------------------------------------------------------- buckets


def test_doc_buckets_are_log2_with_open_last_bucket():
    pos = torch.tensor([0, 1, 2, 3, 4, 7, 8, 1023, 1024, 2**40 - 1, 2**40])
    got = doc_bucket_index(pos, 50).tolist()
    assert got == [0, 1, 2, 2, 3, 3, 4, 10, 11, 40, 41]
    assert doc_bucket_index(pos, 6).tolist() == [min(b, 5) for b in got]
    edges = doc_bucket_edges(6)
    assert edges[:3] == [(0, 1), (1, 2), (2, 4)] and edges[-1] == (16, math.inf)
    for p in range(0, 40):
        start, end = edges[oracle_bucket(p, 6)]
        assert start <= p < end


@pytest.mark.parametrize("seq_len,n", [(24, 4), (10, 3), (7, 7), (4096, 32)])
def test_window_bucket_edges_match_index(seq_len, n):
    idx = window_bucket_index(torch.arange(seq_len), seq_len, n).tolist()
    edges = window_bucket_edges(seq_len, n)
    assert len(edges) == n and edges[0][0] == 0 and edges[-1][1] == seq_len
    for t, b in enumerate(idx):
        assert edges[b][0] <= t < edges[b][1]
    sizes = [e - s for s, e in edges]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------- oracles


def test_loss_and_curves_equal_independent_cross_entropy():
    model = small_llama()
    batches = make_batches(4)
    metrics = ValidationMetrics(["iid", "long"], position_buckets=4, seq_len=T, doc_position_buckets=8)
    with torch.no_grad():
        for i, b in enumerate(batches):
            metrics.update("iid" if i < 3 else "long", token_losses(model, b), b)
        # oracle: full logits, plain F.cross_entropy, python bucketing
        per_set = {"iid": [], "long": []}
        win = {"iid": [[] for _ in range(4)]}
        doc = {"iid": [[] for _ in range(8)]}
        for i, b in enumerate(batches):
            logits = model.logits(model(b["input_ids"]))
            ce = F.cross_entropy(logits.reshape(-1, VOCAB), b["targets"].reshape(-1), reduction="none").view(b["targets"].shape)
            name = "iid" if i < 3 else "long"
            per_set[name].append(ce.reshape(-1))
            if name == "iid":
                for r in range(ce.shape[0]):
                    for t in range(T):
                        win["iid"][t * 4 // T].append(float(ce[r, t]))
                        doc["iid"][oracle_bucket(int(b["doc_positions"][r, t]), 8)].append(float(ce[r, t]))
    res = metrics.results()
    for name in ("iid", "long"):
        expect = torch.cat(per_set[name]).double().mean().item()
        assert res[name].loss == pytest.approx(expect, rel=1e-6)
        assert res[name].tokens == torch.cat(per_set[name]).numel()
    np.testing.assert_allclose(res["iid"].window.mean, [np.mean(v) for v in win["iid"]], rtol=1e-6)
    assert res["iid"].window.counts.tolist() == [len(v) for v in win["iid"]]
    assert res["iid"].document.counts.tolist() == [len(v) for v in doc["iid"]]
    expect_doc = [np.mean(v) if v else np.nan for v in doc["iid"]]
    np.testing.assert_allclose(res["iid"].document.mean, expect_doc, rtol=1e-6)
    out = metrics.compute()
    assert float(out["val/iid/loss"]) == pytest.approx(res["iid"].loss)


def test_count_weighted_curves_average_back_to_the_loss():
    model = small_llama(3)
    metrics = ValidationMetrics(["iid"], position_buckets=5, seq_len=T)
    with torch.no_grad():
        for b in make_batches(3, seed=7):
            metrics.update("iid", token_losses(model, b), b)
    r = metrics.results()["iid"]
    for curve in (r.window, r.document):
        assert curve.counts.sum() == r.tokens
        filled = curve.counts > 0
        weighted = (curve.mean[filled] * curve.counts[filled]).sum() / curve.counts.sum()
        assert weighted == pytest.approx(r.loss, rel=1e-12)


def test_bad_input_is_refused_with_a_clear_message():
    metrics = ValidationMetrics(["iid"], seq_len=T)
    b = make_batches(1)[0]
    with pytest.raises(ValueError, match="unknown validation set 'ood'"):
        metrics.update("ood", torch.zeros(3, T), b)
    with pytest.raises(ValueError, match="doc_positions"):
        metrics.update("iid", torch.zeros(3, T), {k: v for k, v in b.items() if k != "doc_positions"})
    with pytest.raises(ValueError, match="seq_len"):
        ValidationMetrics(["iid"], seq_len=8).update("iid", torch.zeros(3, T), b)
    with pytest.raises(ValueError, match="duplicate"):
        ValidationMetrics(["iid", "iid"], seq_len=T)


def test_float64_sums_survive_a_module_cast_and_reset():
    metrics = ValidationMetrics(["iid"], seq_len=T).to(torch.bfloat16)
    acc = metrics.sets["iid"]
    assert acc.loss_sum.dtype == torch.float64 and acc.tokens.dtype == torch.int64
    b = make_batches(1)[0]
    metrics.update("iid", torch.full((3, T), 1.0 + 2**-20), b)  # not representable in bf16
    assert metrics.results()["iid"].loss == pytest.approx(1.0 + 2**-20, rel=1e-12)
    metrics.reset()
    assert metrics.results()["iid"].tokens == 0 and math.isnan(metrics.results()["iid"].loss)


# ---------------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from megadoc_pl.eval.multiple_choice import MCExample, MultipleChoiceScorer, evaluate_tasks

    torch.set_num_threads(1)  # as the single-process reference: the same kernels, so sums agree to the last bits
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = small_llama()
        batches = make_batches(5)
        metrics = ValidationMetrics(["iid", "long"], position_buckets=4, seq_len=T, doc_position_buckets=8)
        with torch.no_grad():
            for i, b in enumerate(batches):
                if i % world == rank:  # rank 1 sees no 'long' batch: it must still join the sync
                    metrics.update("iid" if i < 4 else "long", token_losses(model, b), b)
        res = metrics.results()

        def reduce_sum(t):
            dist.all_reduce(t)
            return t

        mc_metrics, _ = evaluate_tasks(model, {"toy": _toy_examples()}, MultipleChoiceScorer(_CharTokenizer(), max_length=T),
                                       rank=rank, world_size=world, reduce_sum=reduce_sum)
        torch.save({n: (r.loss, r.tokens, r.window.sums, r.window.counts, r.document.sums, r.document.counts)
                    for n, r in res.items()} | {"mc": mc_metrics}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class _CharTokenizer:
    """Characters -> ids in [3, VOCAB): a real, if trivial, tokenizer for the DDP check."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [3 + (ord(c) % (VOCAB - 3)) for c in text]


def _toy_examples():
    from megadoc_pl.eval.multiple_choice import MCExample

    words = ["red", "blue", "green", "tea", "sky", "sea", "oak"]
    return [MCExample(str(i), f"Q{i}: pick", tuple(words[i % 7:] + words[:i % 7])[:3], i % 3) for i in range(7)]


def test_two_process_ddp_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    single = ValidationMetrics(["iid", "long"], position_buckets=4, seq_len=T, doc_position_buckets=8)
    model = small_llama()
    with one_thread(), torch.no_grad():  # one thread, as in the workers
        for i, b in enumerate(make_batches(5)):
            single.update("iid" if i < 4 else "long", token_losses(model, b), b)
    expect = single.results()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name, r in expect.items():
            loss, tokens, wsum, wcount, dsum, dcount = got[name]
            assert tokens == r.tokens
            assert loss == pytest.approx(r.loss, rel=1e-12, abs=0)
            np.testing.assert_allclose(wsum, r.window.sums, rtol=1e-12)
            np.testing.assert_array_equal(wcount, r.window.counts)
            np.testing.assert_allclose(dsum, r.document.sums, rtol=1e-12)
            np.testing.assert_array_equal(dcount, r.document.counts)
        from megadoc_pl.eval.multiple_choice import MultipleChoiceScorer, evaluate_tasks

        mc_single, _ = evaluate_tasks(model, {"toy": _toy_examples()}, MultipleChoiceScorer(_CharTokenizer(), max_length=T))
        assert got["mc"] == mc_single


# ---------------------------------------------------------------------------------- Lightning


def _val_loaders(n_per_set: dict[str, int]):
    from torch.utils.data import DataLoader

    loaders = []
    for k, (name, n) in enumerate(n_per_set.items()):
        rows = []
        for b in make_batches(n, B=2, seed=100 + k):
            rows += [{key: v[r] for key, v in b.items() if key not in ("cu_seqlens", "max_seqlen")} for r in range(2)]
        loaders.append(DataLoader(rows, batch_size=2, shuffle=False))
    return loaders


def test_log_to_writes_scalars_images_and_csv_from_a_real_trainer(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader

    sets = {"iid": 2, "short": 1}

    class TinyModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = small_llama().train()
            self.val_metrics = ValidationMetrics(list(sets), position_buckets=4, seq_len=T, doc_position_buckets=8)

        def training_step(self, batch, batch_idx):
            hidden = self.model(batch["input_ids"])
            return self.model.loss(hidden, batch["targets"])

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            self.val_metrics.update(list(sets)[dataloader_idx], token_losses(self.model, batch), batch)

        def on_validation_epoch_end(self):
            self.val_metrics.log_to(self)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    train_rows = [{k: v[r] for k, v in b.items() if k not in ("cu_seqlens", "max_seqlen")}
                  for b in make_batches(4, B=2, seed=50) for r in range(2)]
    module = TinyModule()
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(max_steps=4, val_check_interval=2, num_sanity_val_steps=1, logger=logger,
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, DataLoader(train_rows, batch_size=2), _val_loaders(sets))

    # oracle: the final model's loss over the same validation windows, with plain F.cross_entropy
    final = {}
    with torch.no_grad():
        for name, loader in zip(sets, _val_loaders(sets)):
            ces = [F.cross_entropy(module.model.logits(module.model(b["input_ids"])).reshape(-1, VOCAB),
                                   b["targets"].reshape(-1), reduction="none") for b in loader]
            final[name] = torch.cat(ces).double().mean().item()
    for name in sets:
        assert float(trainer.callback_metrics[f"val/{name}/loss"]) == pytest.approx(final[name], rel=1e-5)

    ea = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    for name in sets:
        events = ea.Scalars(f"val/{name}/loss")
        assert len(events) == 2  # two validations; the sanity-check pass is not logged
        assert events[-1].value == pytest.approx(final[name], rel=1e-5)
        images = ea.Images(f"val/{name}/loss_by_position")
        assert [im.step for im in images] == [2, 4]
        assert images[-1].encoded_image_string[:4] == b"\x89PNG"

        rows = read_curves_csv(f"{logger.log_dir}/loss_by_position_{name}.csv")
        assert {r["kind"] for r in rows} == {"window", "document"}
        for kind in ("window", "document"):
            part = [r for r in rows if r["kind"] == kind]
            n = sum(r["count"] for r in part)
            assert n == sets[name] * 2 * T  # batches x rows x tokens
            mean = sum(r["mean_loss"] * r["count"] for r in part if r["count"]) / n
            assert mean == pytest.approx(final[name], rel=1e-5)
        window = [r for r in rows if r["kind"] == "window"]
        assert [(r["bucket_start"], r["bucket_end"]) for r in window] == [(0, 6), (6, 12), (12, 18), (18, 24)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_metrics_on_gpu_equal_cpu_and_survive_bf16_autocast():
    model = small_llama()
    batches = make_batches(3)
    cpu = ValidationMetrics(["iid"], position_buckets=4, seq_len=T)
    gpu = ValidationMetrics(["iid"], position_buckets=4, seq_len=T).cuda()
    gpu_bf16 = ValidationMetrics(["iid"], position_buckets=4, seq_len=T).cuda()
    with torch.no_grad():
        for b in batches:
            cpu.update("iid", token_losses(model, b), b)
        model.cuda()
        for b in batches:
            bc = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            gpu.update("iid", token_losses(model, bc), bc)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                gpu_bf16.update("iid", token_losses(model, bc), bc)
    c, g, h = cpu.results()["iid"], gpu.results()["iid"], gpu_bf16.results()["iid"]
    assert g.loss == pytest.approx(c.loss, rel=1e-4)
    assert h.loss == pytest.approx(c.loss, rel=2e-2)
    assert g.window.counts.tolist() == c.window.counts.tolist()
    assert g.document.counts.tolist() == c.document.counts.tolist()
