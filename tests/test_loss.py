"""Chunked cross-entropy equals F.cross_entropy on full logits (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadoc_pl.model import loss as L

B, T, D, V = 3, 11, 16, 97  # B*T = 33 tokens: chunk sizes below do not divide it


def _inputs(seed: int = 0, ignore: bool = False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, D, generator=g)).requires_grad_()
    t = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        t[0, :4] = -100
        t[2, -1] = -100
    return h, w, t


def _plain(h, w, t, reduction):
    return F.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), reduction=reduction, ignore_index=-100)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, 32, 1000])
@pytest.mark.parametrize("ignore", [False, True])
def test_values_and_grads_match_plain_cross_entropy(reduction, chunk_size, ignore):
    h, w, t = _inputs(ignore=ignore)
    out = L.chunked_cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk_size)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _plain(h2, w2, t, reduction)
    if reduction == "none":
        ref = ref.view(B, T)
        assert out.shape == (B, T)
        g = torch.randn(B, T, generator=torch.Generator().manual_seed(1))
    else:
        g = torch.tensor(1.7)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5, rtol=1e-5)
    if ignore:
        assert h.grad[0, :4].abs().max() == 0  # ignored targets contribute nothing


def test_no_grad_and_reference_helper():
    h, w, t = _inputs()
    with torch.no_grad():
        out = L.chunked_cross_entropy(h, w, t, chunk_size=5)
    torch.testing.assert_close(out, L.reference_cross_entropy(h, w, t).detach(), atol=1e-6, rtol=1e-6)
    assert L.reference_cross_entropy(h, w, t, reduction="none").shape == (B, T)


def test_logits_are_never_larger_than_one_chunk(monkeypatch):
    seen = []
    real = L._chunk_logits

    def spy(h_cD, w_VD, dtype):
        seen.append(h_cD.shape[0])
        return real(h_cD, w_VD, dtype)

    monkeypatch.setattr(L, "_chunk_logits", spy)
    for reduction in ("mean", "none"):
        h, w, t = _inputs()
        L.chunked_cross_entropy(h, w, t, reduction=reduction, chunk_size=8).sum().backward()
    assert seen and max(seen) <= 8
    # 'mean' computes grads in its forward walk; 'none' walks again in backward
    assert len(seen) == 5 + 2 * 5


def test_bf16_autocast_close_to_fp32():
    h, w, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.chunked_cross_entropy(h, w, t, chunk_size=8)
    out.backward()
    assert out.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(out, _plain(h, w, t, "mean"), atol=3e-2, rtol=3e-2)


def test_bad_arguments():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="unknown reduction"):
        L.chunked_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="targets shape"):
        L.chunked_cross_entropy(h, w, t[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        L.chunked_cross_entropy(h, w, t, chunk_size=0)
