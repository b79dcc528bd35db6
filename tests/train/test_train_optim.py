"""AdamW groups and the per-step schedules (docs/training.md, "Optimizer and schedule")."""

from __future__ import annotations

import math

import pytest
import torch

from megadoc_pl.model.llama import Llama, LlamaConfig
from megadoc_pl.train.optim import (
    LRSchedule,
    build_adamw,
    build_scheduler,
    make_schedule,
    split_no_decay,
    warmup_steps,
)


def _tiny() -> Llama:
    return Llama(LlamaConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_mlp=64, vocab_size=50))


def test_no_decay_groups_norms_and_embeddings():
    model = _tiny()
    decay, keep = split_no_decay(model.named_parameters(), ("norm", "bias", "embed"))
    keep_names = {n for n, _ in keep}
    decay_names = {n for n, _ in decay}
    assert keep_names == {"embed.weight", "norm.weight"} | {
        f"layers.{i}.{k}.weight" for i in range(2) for k in ("attn_norm", "mlp_norm")
    }
    # the untied LM head and every projection matrix are decayed (Levanter's default mask)
    assert "lm_head.weight" in decay_names
    assert {f"layers.0.{k}.weight" for k in ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")} <= decay_names
    assert len(decay) + len(keep) == len(list(model.parameters()))


def test_no_decay_is_configurable_and_case_insensitive():
    model = _tiny()
    decay, keep = split_no_decay(model.named_parameters(), ("LM_HEAD",))
    assert [n for n, _ in keep] == ["lm_head.weight"]
    decay, keep = split_no_decay(model.named_parameters(), ())
    assert keep == []


def test_adamw_decoupled_decay_shrinks_by_lr_times_wd():
    # zero gradient: Adam's update is 0, so only the decoupled decay acts: p <- p * (1 - lr * wd)
    model = _tiny()
    opt = build_adamw(model.named_parameters(), lr=0.1, weight_decay=0.5, betas=(0.9, 0.95), eps=1e-8,
                      no_decay=("norm", "embed"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["lm_head.weight"], before["lm_head.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["embed.weight"], before["embed.weight"])
    torch.testing.assert_close(after["norm.weight"], before["norm.weight"])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8


def test_cosine_schedule_known_values():
    s = make_schedule("cosine", total_steps=1000, warmup_fraction=0.01, decay_fraction=0.2)
    assert s.warmup == 10
    assert s(0) == 0.0
    assert s(5) == 0.5
    assert s(10) == 1.0  # warmup end = peak lr
    assert s(10 + 495) == pytest.approx(0.5)  # half way through the cosine
    assert s(1000) == 0.0  # cosine end = 0
    assert 0 < s(999) < 1e-4
    values = [s(i) for i in range(10, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warmup


def test_paper_warmup_is_one_percent_floor():
    # 300M, real-only E=16: 12,432 steps -> 124 warmup steps
    assert warmup_steps(12432, 0.01) == 124
    assert make_schedule("cosine", 20, 0.01, 0.2)(0) == 1.0  # under 100 steps: no warmup at all


def test_wsd_schedule_shape():
    s = make_schedule("wsd", total_steps=100, warmup_fraction=0.1, decay_fraction=0.2)
    assert (s.warmup, s.decay) == (10, 20)
    assert [s(i) for i in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert all(s(i) == 1.0 for i in range(10, 81))  # stable through the start of the decay
    assert s(90) == pytest.approx(0.5)
    assert s(100) == 0.0
    assert s(99) == pytest.approx(0.05)


def test_schedule_errors_are_one_line():
    with pytest.raises(ValueError, match="train.schedule must be one of cosine, wsd"):
        make_schedule("linear", 10, 0.1, 0.2)
    with pytest.raises(ValueError, match="warmup_fraction"):
        make_schedule("cosine", 10, 1.5, 0.2)
    with pytest.raises(ValueError, match="exceed"):
        make_schedule("wsd", 10, 0.5, 0.6)


def test_lambda_lr_applies_schedule_per_step_and_round_trips():
    model = _tiny()
    opt = build_adamw(model.named_parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_decay=())
    sched = build_scheduler(opt, make_schedule("cosine", 20, 0.1, 0.2))
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(2e-3)
    assert lrs[2 + 9] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert opt.param_groups[0]["lr"] == 0.0  # after the last step: the cosine has reached 0
    # the schedule object's fields travel in the scheduler state
    state = sched.state_dict()
    fresh = build_scheduler(opt, LRSchedule("cosine", 1, 0))
    fresh.load_state_dict(state)
    assert fresh.lr_lambdas[0] == LRSchedule("cosine", 20, 2)


def test_adamw_is_fused_on_cuda_only():
    """CPU runs keep the for-each AdamW (the golden curves' numbers); CUDA runs get the fused kernel, as benchmarked."""
    model = torch.nn.Linear(4, 4)
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_decay=())
    assert not opt.defaults["fused"]
    forced = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                         no_decay=(), fused=True)
    assert forced.defaults["fused"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_fused_on_the_gpu():
    model = torch.nn.Linear(4, 4).cuda()
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, no_decay=())
    assert opt.defaults["fused"]
    model(torch.ones(2, 4, device="cuda")).sum().backward()
    opt.step()
