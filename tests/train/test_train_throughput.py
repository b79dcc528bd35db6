"""ThroughputMonitor: tokens/s and MFU from a fake clock, a fake FLOP count and a fake peak, exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megadoc_pl.train.callbacks import ThroughputMonitor

TOKENS_PER_STEP = 1000
# (causal query-key pairs, tokens) of each optimizer step's batches: ten segments of 100 tokens
# (50.5 keys per query on average) twice, then one segment of 1000 (500.5) twice.
ATTENTION = [(10 * 5050, 1000), (10 * 5050, 1000), (500500, 1000), (500500, 1000)]


class FakeModule:
    """What the monitor asks of the LightningModule: this step's attention stats, and ``log``."""

    def __init__(self, attention=ATTENTION) -> None:
        self.stats = list(attention)
        self.logged: list[tuple[str, float]] = []

    def take_attention_stats(self) -> tuple[int, int]:
        return self.stats.pop(0)

    def log(self, name: str, value: float, **kw) -> None:
        self.logged.append((name, value))


def _run(peak, clock_times, steps_of_batches, attention=ATTENTION):
    clock = iter(clock_times)  # one reading per optimizer step, none per micro-batch
    monitor = ThroughputMonitor(TOKENS_PER_STEP, flops_fn=lambda keys: 1000.0 + 2.0 * keys,
                                peak_flops_per_device=peak, window=2, clock=lambda: next(clock))
    trainer, module = SimpleNamespace(global_step=0, world_size=2), FakeModule(attention)
    monitor.on_train_start(trainer, module)
    history = []
    for global_step in steps_of_batches:
        trainer.global_step = global_step
        monitor.on_train_batch_end(trainer, module, None, None, 0)
        history.append(dict(monitor.last))
    assert next(clock, None) is None and module.stats == []  # every reading and every stat was used
    return history, module.logged


def test_tokens_per_second_and_mfu_are_exact():
    # global_step after each batch: two micro-batches per step for the first step (accumulation)
    history, logged = _run(1e6, [0.0, 1.0, 2.0, 6.0], [0, 1, 1, 2, 3, 4])
    first_step = history[:3]
    assert first_step == [{}, {}, {}]  # accumulating, then the first step: nothing timed yet
    # step 2: one step in 1 s; keys over steps 1-2 = 101000 / 2000 = 50.5 -> 1101 FLOPs per token
    assert history[3] == {"train/tokens_per_s": 1000.0, "train/step_time_s": 1.0,
                          "train/flops_per_token": 1101.0, "train/mfu": 1101.0 * 1000.0 / (1e6 * 2)}
    assert history[3]["train/mfu"] == 0.5505
    # step 3: two steps in 2 s; keys over steps 2-3 = 551000 / 2000 = 275.5 -> 1551
    assert history[4] == {"train/tokens_per_s": 1000.0, "train/step_time_s": 1.0,
                          "train/flops_per_token": 1551.0, "train/mfu": 0.7755}
    # step 4: the window drops step 1: two steps in 5 s; keys over steps 3-4 = 500.5 -> 2001
    assert history[5] == {"train/tokens_per_s": 400.0, "train/step_time_s": 2.5,
                          "train/flops_per_token": 2001.0, "train/mfu": 0.4002}
    assert logged == [item for h in history[3:] for item in h.items()]


def test_no_mfu_without_a_peak():
    history, logged = _run(None, [0.0, 4.0], [1, 2], ATTENTION[:2])
    assert history[-1] == {"train/tokens_per_s": 250.0, "train/step_time_s": 4.0, "train/flops_per_token": 1101.0}
    assert logged == list(history[-1].items())


def test_training_restart_forgets_the_old_clock():
    monitor = ThroughputMonitor(TOKENS_PER_STEP, window=2, clock=iter([100.0, 0.0, 3.0]).__next__)
    trainer, module = SimpleNamespace(global_step=5, world_size=1), FakeModule()
    monitor.on_train_start(trainer, module)
    trainer.global_step = 6
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    monitor.on_train_start(trainer, module)  # e.g. a second fit: the pause is not training time
    for step in (7, 8):
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert monitor.last == pytest.approx({"train/tokens_per_s": 1000 / 3, "train/step_time_s": 3.0})


def test_attention_stats_and_window_numbers_come_from_the_packed_batch_on_the_cpu():
    """Loaders ship packed batches: the module reads their segment offsets and window numbers
    before the batch moves, so FLOPs per token charge short documents only the keys they attend
    (the formula over the batch's true segment lengths) and no step syncs on ``window_index``."""
    from fractions import Fraction

    import numpy as np

    from megadoc_pl.data.mixture import StreamDrawer
    from megadoc_pl.data.views import LiteralTokens, documents_units
    from megadoc_pl.data.batch import unpack
    from megadoc_pl.data.windows import StreamWindows, Windows
    from megadoc_pl.model.config import LlamaConfig
    from megadoc_pl.model.flops import flops_per_token, mean_attended_keys
    from megadoc_pl.recipes import load_recipe
    from megadoc_pl.train.module import MegadocLM

    T = 32
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 12, 60).tolist()  # documents much shorter than the window
    src = LiteralTokens([rng.integers(3, 200, n).tolist() for n in lengths], [f"d{i}" for i in range(len(lengths))])
    st = StreamWindows(documents_units(src), T, name="d", shuffle=False, repeat=False, window_order="sequential")
    w = Windows([st], StreamDrawer([st.name], [Fraction(1)]), T, "document", st.num_windows)
    packed = w.packed(np.arange(4))
    want = unpack(packed)
    cu = want["cu_seqlens"].numpy()
    assert len(cu) > 4 + 1  # several documents per row

    cfg = load_recipe("baseline_real", ["model.size=nano", "model.vocab_size=256", f"data.seq_len={T}",
                                        "train.max_steps=1"])
    module = MegadocLM(cfg)
    module._trainer = SimpleNamespace(training=True)
    assert module.on_before_batch_transfer(packed, 0) is packed
    assert module._pending_windows.tolist() == want["window_index"].tolist()
    pairs, tokens = module.take_attention_stats()
    seg_lengths = np.diff(cu)
    assert tokens == 4 * T and pairs == sum(n * (n + 1) // 2 for n in seg_lengths.tolist())
    model_cfg = LlamaConfig.from_recipe(cfg)
    keys = mean_attended_keys(seg_lengths)
    assert flops_per_token(model_cfg, T, pairs / tokens) == flops_per_token(model_cfg, T, keys)
    assert keys < mean_attended_keys([T])  # what the monitor charged before: whole-window keys
    packed["buffer"][:] = 0  # a worker reusing its slot does not change what was read
    assert module._pending_windows.tolist() == want["window_index"].tolist()
    # a batch already on a device is not read (that would be a sync); evaluation batches are not counted
    module._trainer = SimpleNamespace(training=False)
    module.on_before_batch_transfer(w.packed(np.arange(4)), 0)
    assert module.take_attention_stats() == (0, 0)
