"""The LightningDataModule: rank sharding by index, exact resume through Lightning, fingerprints."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from megadoc_pl.data.batch import unpack
from megadoc_pl.data.datamodule import (MegadocDataModule, PaddingBatch, TrainBatchSampler, ValBatchSampler,
                                         accumulation_steps)
from megadoc_pl.data.mixture import paper_plan
from megadoc_pl.data.views import ViewOptions, build_view, documents_units, real_units
from megadoc_pl.data.windows import SharedPasses, StreamWindows, Windows

from helpers import load_script
from test_views import HELDOUT, make_corpus

T = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_path) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer_path)


def make_dm(corpus, global_batch=4, micro=2, seed=0, fingerprint="fp-A", num_workers=0, max_steps=None,
            passes=None) -> MegadocDataModule:
    R, S = corpus["real"], corpus["synth"]
    ru = real_units(R, HELDOUT)
    su = build_view(R, S, ViewOptions(view="stitch", generations=2, short_pool="drop"), HELDOUT)
    plan = paper_plan(ru.num_tokens, 2, 0.5, global_batch, T, su.num_tokens)
    steps = max_steps or plan.steps
    shared = SharedPasses(passes) if passes else None
    streams = {"real": StreamWindows(ru, T, seed, "real", shared=shared),
               "synthetic": StreamWindows(su, T, seed, "synthetic", shared=shared)}
    train = Windows.from_plan(streams, plan, "document", length=steps * global_batch)
    val = {"iid": Windows.sequential(documents_units(R, np.array([R.find("d4")[0], 0, 1]), "iid"), T, "document")}
    return MegadocDataModule(train, val, plan, micro_batch_size=micro, max_steps=steps, num_workers=num_workers,
                             fingerprint=fingerprint)


def test_accumulation_steps():
    assert accumulation_steps(64, 8, 1) == 8 and accumulation_steps(64, 8, 8) == 1 and accumulation_steps(64, 4, 2) == 8
    with pytest.raises(ValueError, match=r"global_batch_size \(64\) must be a multiple of .* \(8\) x world size \(3\) = 24"):
        accumulation_steps(64, 8, 3)


@pytest.mark.parametrize("micro", [1, 2])
def test_rank_shards_are_disjoint_complete_and_world_size_invariant(micro):
    G, steps = 8, 5
    per_step = {}
    for world in (1, 2, 4):
        if G % (micro * world):
            continue
        step_sets = [set() for _ in range(steps)]
        seen = []
        for rank in range(world):
            batches = list(TrainBatchSampler(lambda: 0, steps, G, micro, rank, world))
            A = G // (micro * world)
            assert len(batches) == steps * A and all(len(b) == micro for b in batches)
            for i, b in enumerate(batches):
                step_sets[i // A].update(b)
                seen += b
        assert sorted(seen) == list(range(steps * G))  # disjoint and complete
        assert [sorted(s) for s in step_sets] == [list(range(s * G, (s + 1) * G)) for s in range(steps)]
        per_step[world] = step_sets
        if world == 1:  # one rank reads the global order itself
            assert [i for b in TrainBatchSampler(lambda: 0, steps, G, micro) for i in b] == list(range(steps * G))
    assert all(v == per_step[1] for v in per_step.values())
    # Resuming at step 3 yields exactly the rest.
    rest = [i for b in TrainBatchSampler(lambda: 3 * G, steps, G, micro) for i in b]
    assert rest == list(range(3 * G, steps * G))
    with pytest.raises(ValueError, match="not a whole number of global batches"):
        list(TrainBatchSampler(lambda: 3, steps, G, micro))


@pytest.mark.parametrize("n, world", [(11, 1), (11, 2), (11, 3), (11, 4), (11, 5), (1, 4), (3, 8), (12, 4)])
def test_val_shards_disjoint_complete_and_equal_on_any_world(n, world):
    per_rank = [list(ValBatchSampler(n, 3, r, world)) for r in range(world)]
    counted = [i for batches in per_rank for b in batches if not isinstance(b, PaddingBatch) for i in b]
    assert sorted(counted) == list(range(n))  # every window exactly once
    batches = -(-n // 3)
    assert {len(b) for b in per_rank} == {-(-batches // world)}  # every rank the same number of batches
    assert all(len(s) == len(b) for s, b in zip((ValBatchSampler(n, 3, r, world) for r in range(world)), per_rank))
    pads = sum(isinstance(b, PaddingBatch) for batches_ in per_rank for b in batches_)
    assert pads == world * -(-batches // world) - batches


def test_padding_batches_are_marked():
    from megadoc_pl.data.datamodule import PackedWindows

    class FakeWindows(list):
        def packed(self, index, alloc=None):
            return {"window_index": list(index)}

    ds = PackedWindows(FakeWindows(range(5)))
    assert "padding" not in ds[[0, 1]]
    assert ds[PaddingBatch([0, 1])]["padding"] is True


def test_dataloaders_with_workers_match_in_process(corpus, tmp_path):
    """Workers pack into reused shared-memory slots once the module has unpacked a batch
    (on_after_batch_transfer releases it); without a release they pack into fresh buffers.
    Either way every batch equals the in-process one. The workers share pass orders and window
    tables through files (as prepare_corpus sets up with workers)."""
    from megadoc_pl.data.datamodule import SLOTS_PER_WORKER

    a, b = make_dm(corpus), make_dm(corpus, num_workers=2, passes=tmp_path / "passes")
    slots, n = [], 0
    for release in (True, False):
        for x, y in zip(a.train_dataloader(), b.train_dataloader()):
            slots.append(y.get("slot", (None, None))[1])
            x, y = a.on_after_batch_transfer(x, 0), (b.on_after_batch_transfer(y, 0) if release else unpack(y))
            assert set(x) == set(y)
            for k in x:
                assert (x[k] == y[k]).all() if torch.is_tensor(x[k]) else x[k] == y[k]
            n += 1
        if release:  # every batch came in a slot, and slots were reused
            assert None not in slots and len(set(slots)) < len(slots) and len(slots) > 2 * SLOTS_PER_WORKER
            slots = []
    assert slots.count(None) > 0  # unreleased: the workers ran out of slots and packed into fresh buffers
    assert list((tmp_path / "passes").glob("order-*.npy")) and list((tmp_path / "passes").glob("windows-*.npy"))
    v = unpack(next(iter(a.val_dataloader()[0])))
    assert v["window_index"].tolist() == [0, 1]
    assert a.val_set_names == ["iid"]


def test_slot_buffers_travel_once_and_again_when_regrown(corpus):
    """A slot's buffer goes to the main process with the first batch packed into it; later
    batches in it carry only its number, and a batch too large for it makes the worker regrow
    the slot and send the new buffer. With batches that grow twice, through one worker: every
    batch equals the in-process one, a few buffers travel (not one per batch), and the main
    process ends up holding buffers large enough for the largest batch."""
    from megadoc_pl.data.datamodule import SLOT, PackedWindows, SlotLoader, release_slot
    from megadoc_pl.data.batch import packed_bytes

    w = make_dm(corpus).train_windows
    index = [list(range(k, k + n)) for k, n in enumerate([1] * 12 + [4] * 12 + [16] * 12)]
    travelled = []

    class Counting(PackedWindows):  # runs in the worker: marks batches that bring their slot's buffer
        def __getitem__(self, i):
            b = super().__getitem__(i)
            b["brought"] = b[SLOT][2] is not None
            return b

    ds = Counting(w)
    for got, i in zip(SlotLoader(ds, batch_size=None, sampler=index, num_workers=1), index):
        assert got["buffer"].numel() == packed_bytes(got) and len(got[SLOT]) == 2
        x, y = unpack(got), w.batch(i)
        assert x.keys() - {"brought"} == y.keys()
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(y[k]) else x[k] == y[k] for k in y)
        travelled.append(got["brought"])
        release_slot(got)
    for phase in (0, 12, 24):  # a size's first batch brings a (re)grown buffer; once the few slots
        # in flight are regrown, batches carry only their slot's number
        assert travelled[phase] and not any(travelled[phase + 6:phase + 12])
    assert min(t.numel() for t in ds.pool.received.values()) >= packed_bytes(w.packed(index[-1]))


def test_two_loaders_of_one_dataset_never_share_slots(corpus):
    """Each SlotLoader gives the workers it starts a pool of their own: two loaders of the same
    PackedWindows, iterated in step (their workers have the same ids), both give the in-process
    batches; a plain DataLoader with workers gets whole batches too (a fresh buffer each)."""
    from torch.utils.data import DataLoader

    from megadoc_pl.data.datamodule import SLOT, PackedWindows, SlotLoader, release_slot

    w = make_dm(corpus).train_windows
    index = [list(range(k, k + 4)) for k in range(0, 96, 4)]
    ds = PackedWindows(w)
    a, b = (SlotLoader(ds, batch_size=None, sampler=index, num_workers=2) for _ in range(2))
    pools = set()
    for x, y, i in zip(a, b, index):
        want = w.batch(i)
        for got in (x, y):
            pools.add(got[SLOT][0])
            assert all(torch.equal(unpack(got)[k], want[k]) for k in ("input_ids", "targets", "position_ids"))
            release_slot(got)
    assert len(pools) == 2
    for got, i in zip(DataLoader(PackedWindows(w), batch_size=None, sampler=index, num_workers=2), index):
        assert SLOT not in got and torch.equal(unpack(got)["input_ids"], w.batch(i)["input_ids"])


def test_a_slot_batch_outside_its_loader_is_one_clear_error():
    from megadoc_pl.data.datamodule import SLOT, SlotPool, receive_slot

    with pytest.raises(RuntimeError, match="does not hold that pool"):
        receive_slot({SLOT: [10**9, 0, None], "buffer": None})
    pool = SlotPool(num_workers=1)
    with pytest.raises(RuntimeError, match="arrived before that slot's buffer.*SlotLoader"):
        receive_slot({SLOT: [pool.key, 3, None], "buffer": None})
    plain = {"buffer": torch.zeros(4)}
    assert receive_slot(plain) is plain


def test_a_pinned_slot_batch_is_a_copy_and_frees_its_slot(monkeypatch):
    """With pinned memory (a GPU run), the main process copies a slot's batch into pinned memory
    and frees the slot at once (no GPU here: pinning is a recorded copy)."""
    from megadoc_pl.data.datamodule import SLOT, SlotPool, receive_slot
    from megadoc_pl.data.batch import PACKED, packed_bytes

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.clone()) or pinned[-1])
    pool = SlotPool(num_workers=1)
    layout = (1, 3, 2, 1, 2)
    pool.busy[2] = 1
    batch = {PACKED: layout, "buffer": None, SLOT: [pool.key, 2, None]}
    pool.received[2] = torch.arange(64, dtype=torch.uint8)
    got = receive_slot(batch, pin=True)
    assert got["buffer"] is pinned[0] and torch.equal(got["buffer"], torch.arange(packed_bytes(got), dtype=torch.uint8))
    assert SLOT not in got and int(pool.busy[2]) == 0


class _Recorder(pl.LightningModule):
    """A one-parameter model that records the windows it trains on."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["window_index"].tolist())
        return (self.w - batch["input_ids"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _trainer(max_steps, accumulate, root):
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                      accumulate_grad_batches=accumulate, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(root))


def test_exact_resume_mid_run_through_lightning(corpus, tmp_path):
    G, micro = 4, 2
    full_dm, full = make_dm(corpus, G, micro), _Recorder()
    steps = full_dm.max_steps
    assert steps >= 6
    _trainer(steps, 2, tmp_path).fit(full, datamodule=full_dm)
    flat = [i for b in full.seen for i in b]
    assert flat == list(range(steps * G))

    part_dm, part = make_dm(corpus, G, micro), _Recorder()
    t = _trainer(3, 2, tmp_path)
    t.fit(part, datamodule=part_dm)
    assert part_dm.state_dict()["windows_consumed"] == 3 * G
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed_dm, resumed = make_dm(corpus, G, micro), _Recorder()
    _trainer(steps, 2, tmp_path).fit(resumed, datamodule=resumed_dm, ckpt_path=str(ckpt))
    assert part.seen + resumed.seen == full.seen  # nothing skipped, nothing repeated
    assert resumed_dm.windows_consumed() == steps * G

    other = make_dm(corpus, G, micro, fingerprint="fp-B")
    with pytest.raises(ValueError, match="dataset fingerprint .* differs"):
        _trainer(steps, 2, tmp_path).fit(_Recorder(), datamodule=other, ckpt_path=str(ckpt))


def test_state_dict_round_trip_without_a_trainer(corpus):
    dm = make_dm(corpus)
    dm.load_state_dict({"fingerprint": "fp-A", "windows_consumed": 8, "global_step": 2})
    assert dm.windows_consumed() == 8
    first = unpack(next(iter(dm.train_dataloader())))
    assert first["window_index"].tolist() == [8, 9]
    with pytest.raises(ValueError, match="fingerprint"):
        dm.load_state_dict({"fingerprint": "other", "windows_consumed": 0})


def test_describe_windows(corpus):
    dm = make_dm(corpus)
    d = dm.describe_windows([0, 1])
    assert [x["index"] for x in d] == [0, 1]
    assert {x["stream"] for x in d} <= {"real", "synthetic"}
    assert all(sum(p["window_end"] - p["window_start"] for p in x["pieces"]) == T + 1 for x in d)


# ---------------------------------------------------------------------------------------------
# The pipeline: user paths and the demo


def _user_recipe(corpus, tmp_path, view="stitch", extra=()):
    from megadoc_pl.recipes import load_recipe

    root = corpus["root"]
    return load_recipe("megadoc_stitch", [
        f"data.real={root / 'real.jsonl'}", f"data.synthetic={root / 'gen.jsonl'}",
        f"data.tokenizer={corpus['info'].path}", f"data.cache_dir={tmp_path / 'cache'}", f"data.view={view}",
        "data.generations=2", "data.short_pool=drop", "data.seq_len=16", "train.global_batch_size=4",
        "train.micro_batch_size=2", "data.val.num_iid=1", "data.val.num_long=1", "data.val.num_short=1",
        "data.val.long_threshold=20", "data.val.short_threshold=16", "data.val.max_heldout_fraction=0.5",
        "data.mixture.real_epochs=2", "data.mixture.synthetic_fraction=0.5", "train.max_steps=null",
        # the generations were made from every document, held-out ones included (refused by default)
        "data.drop_heldout_generations=true", *extra])


def test_pipeline_with_user_paths_keeps_heldout_out_of_training(corpus, tmp_path):
    from megadoc_pl.data.prepare import prepare_corpus

    cfg = _user_recipe(corpus, tmp_path)
    prep = prepare_corpus(cfg)
    assert prep.heldout and prep.synthetic is not None
    train = prep.train_windows()
    seen = set()
    for k in range(len(train)):
        seen |= {p["source_id"] for p in train.describe(k)["pieces"]}
    assert seen and not (seen & prep.heldout)
    val = prep.val_windows()
    assert set(val) <= {"iid", "long", "short"} and val
    for name, w in val.items():
        ids = {p["source_id"] for k in range(len(w)) for p in w.describe(k)["pieces"]}
        assert ids <= prep.heldout, name
    # The same recipe prepares the same data (cached stores, same fingerprint); the seed matters.
    again = prepare_corpus(cfg)
    assert again.fingerprint == prep.fingerprint and again.real.path == prep.real.path
    other = prepare_corpus(_user_recipe(corpus, tmp_path, extra=["train.data_seed=7"]))
    assert other.fingerprint != prep.fingerprint
    assert not np.array_equal(other.train_windows().tokens([0, 1, 2, 3]), train.tokens([0, 1, 2, 3]))
    dm = prep.datamodule()
    assert dm.vocab_size == corpus["info"].vocab_size and dm.plan is prep.plan and dm.prepared is prep


def test_pipeline_extra_validation_sets_and_val_scope(corpus, tmp_path):
    import json

    from megadoc_pl.data.prepare import prepare_corpus

    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"id": f"o{i}", "text": "A mixture draws windows from the real stream. " * 3}) + "\n"
                           for i in range(3)))
    prep = prepare_corpus(_user_recipe(corpus, tmp_path, extra=[f"data.val.extra.ood={ood}", "data.val.scope=window",
                                                                   "model.attention_scope=document"]))
    val = prep.val_windows()
    assert "ood" in val and prep.val_units["ood"].num_units == 3
    w = val["ood"]
    assert {p["source_id"] for k in range(len(w)) for p in w.describe(k)["pieces"]} == {"o0", "o1", "o2"}
    assert w.scope == "window" and prep.train_windows().scope == "document"
    assert (w.batch([0])["segment_ids"] == 0).all()


def test_pipeline_errors_are_one_line(corpus, tmp_path):
    from megadoc_pl.data.prepare import prepare_corpus

    with pytest.raises(ValueError, match="data.tokenizer is not"):
        prepare_corpus(_user_recipe(corpus, tmp_path, extra=["data.tokenizer=null"]))
    with pytest.raises(ValueError, match="needs a synthetic stream"):
        prepare_corpus(_user_recipe(corpus, tmp_path, view="real"))
    with pytest.raises(ValueError, match=r"synthetic_fraction must be in \[0, 1\)"):
        prepare_corpus(_user_recipe(corpus, tmp_path, extra=["data.mixture.synthetic_fraction=1.0"]))
    with pytest.raises(ValueError, match="data.synthetic is not set"):
        prepare_corpus(_user_recipe(corpus, tmp_path, extra=["data.synthetic=null"]))


def test_dry_run_and_dump_windows_on_the_demo(tmp_path, capsys):
    import json

    common = [f"data.cache_dir={tmp_path / 'cache'}", "demo.num_documents=150", "data.generations=2",
              "data.val.num_iid=10", "data.val.num_long=5", "data.val.num_short=5"]
    assert load_script("recipes/train.py").main(["--recipe", "megadoc_stitch", "--dry-run", *common]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["view"] == "stitch" and plan["plan"]["steps"] > 0 and plan["parameters"] > 0
    assert set(plan["plan"]["streams"]) == {"real", "synthetic"}
    assert plan["plan"]["streams"]["synthetic"]["fraction_of_tokens"] == pytest.approx(0.9, abs=1e-3)
    assert plan["flops"]["total"] > 0 and "device" in plan["hardware"]
    assert plan["max_steps"] == 300 and plan["trained_tokens"] == 300 * 8 * 256
    rows = tmp_path / "w.jsonl"
    dump = load_script("tools/dump_windows.py")
    assert dump.main(["--recipe", "megadoc_stitch", *common, "--split", "train", "--start", "3", "--count", "2",
                      "--out", str(rows)]) == 0
    got = [json.loads(x) for x in rows.read_text().splitlines()]
    assert [r["index"] for r in got] == [3, 4]
    for r in got:
        assert len(r["tokens"]) == 256 + 1 and r["text"]
        assert sum(s["window_end"] - s["window_start"] for s in r["sources"]) == 257
        assert all(s["source_id"] for s in r["sources"])
    capsys.readouterr()
    assert dump.main(["--recipe", "megadoc_stitch", *common, "--split", "val/nope", "--out", str(rows)]) == 2
    assert "is not one of train, val/iid" in capsys.readouterr().err


def test_slot_pool_reuses_released_buffers_and_grows_them(monkeypatch):
    """A worker's slots: busy ones are skipped, a released one is reused (regrown when a batch
    no longer fits), and with every slot busy there is none (the batch gets a fresh buffer)."""
    import types

    import torch.utils.data as tud

    from megadoc_pl.data.datamodule import SLOTS_PER_WORKER, SlotPool, release_slot

    pool = SlotPool(num_workers=2)
    assert pool.take(100) is None  # not in a worker: no slot
    monkeypatch.setattr(tud, "get_worker_info", lambda: types.SimpleNamespace(id=1))
    first, buf, whole = pool.take(100)
    assert first == SLOTS_PER_WORKER and buf.numel() == 100 and pool.busy[first] == 1
    assert whole.data_ptr() == buf.data_ptr() and whole.numel() >= 100  # a new slot travels with its batch
    second, _, _ = pool.take(100)
    assert second == first + 1
    buf[:] = 7
    release_slot({"slot": (pool.key, first)})
    again, same, whole = pool.take(110)  # fits the first buffer's headroom: the same memory, not sent again
    assert again == first and same.data_ptr() == buf.data_ptr() and int(same[0]) == 7 and whole is None
    release_slot({"slot": (pool.key, first)})
    grown, bigger, whole = pool.take(10_000)
    assert grown == first and bigger.numel() == 10_000 and bigger.data_ptr() != buf.data_ptr()
    assert whole.data_ptr() == bigger.data_ptr()  # a regrown slot travels again
    while pool.take(100) is not None:
        pass
    assert int(pool.busy[SLOTS_PER_WORKER:].sum()) == SLOTS_PER_WORKER and int(pool.busy[:SLOTS_PER_WORKER].sum()) == 0
