"""LM-head losses equal F.cross_entropy on full logits (values and gradients): chunked, compiled, liger."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
import torch.nn.functional as F

from megadoc_pl import config
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
    out = L.cross_entropy(h, w, t, reduction=reduction, chunk_size=chunk_size, impl="chunked")
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
        out = L.cross_entropy(h, w, t, chunk_size=5, impl="chunked")
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
        L.cross_entropy(h, w, t, reduction=reduction, chunk_size=8, impl="chunked").sum().backward()
    assert seen and max(seen) <= 8
    # 'mean' computes grads in its forward walk; 'none' walks again in backward
    assert len(seen) == 5 + 2 * 5


def test_bf16_autocast_close_to_fp32():
    h, w, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.cross_entropy(h, w, t, chunk_size=8, impl="chunked")
    out.backward()
    assert out.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    torch.testing.assert_close(out, _plain(h, w, t, "mean"), atol=3e-2, rtol=3e-2)


def test_bad_arguments():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="unknown reduction"):
        L.cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="targets shape"):
        L.cross_entropy(h, w, t[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        L.cross_entropy(h, w, t, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# compiled: the same walk, each chunk fused by torch.compile (inductor on CPU here)

COMPILED_CHUNK = 8  # one chunk shape for every compiled test, so the process compiles each graph once


def _compiled_counts():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_matches_oracle_and_chunked(reduction):
    """fp32, ignored targets, a last chunk of 1 token (33 = 4 * 8 + 1), gradients of h and W.

    Not bitwise: the fused kernels sum the log-sum-exp and the gradient matmuls' inputs in another
    order than eager PyTorch, so fp32 rounding differs at ~1e-7 relative; 1e-5 leaves margin.
    """
    torch.set_num_threads(1)
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(1)) if reduction == "none" else torch.tensor(1.7)
    results = []
    for impl in ("reference", "chunked", "compiled"):
        h, w, t = _inputs(ignore=True)
        if impl == "reference":
            out = L.reference_cross_entropy(h, w, t, reduction)
        else:
            out = L.cross_entropy(h, w, t, reduction, chunk_size=COMPILED_CHUNK, impl=impl)
        (out * g).sum().backward()
        results.append((impl, out.detach(), h.grad, w.grad))
    _, *ref = results[0]
    for impl, *got in results[1:]:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl} {reduction}: {m}")
    assert results[2][2][0, :4].abs().max() == 0  # ignored targets contribute nothing


def test_compiled_compiles_once_for_any_token_count():
    torch.set_num_threads(1)
    h, w, t = _inputs(ignore=True)
    L.cross_entropy(h, w, t, chunk_size=COMPILED_CHUNK, impl="compiled").backward()  # 33 tokens
    with torch.no_grad():
        L.cross_entropy(h, w, t, "none", chunk_size=COMPILED_CHUNK, impl="compiled")
    before = _compiled_counts()
    assert before >= 2  # the counter sees compiles: the gradient and the no-grad graph at least
    g = torch.Generator().manual_seed(3)
    for n_tokens in (2 * 9, 5, 40):  # a partial chunk, less than one chunk, whole chunks
        h2 = torch.randn(1, n_tokens, D, generator=g).requires_grad_()
        t2 = torch.randint(0, V, (1, n_tokens), generator=g)
        out = L.cross_entropy(h2, w, t2, "sum", chunk_size=COMPILED_CHUNK, impl="compiled")
        out.backward()
        torch.testing.assert_close(out, L.reference_cross_entropy(h2, w, t2, "sum"), atol=1e-5, rtol=1e-5)
        tok = L.cross_entropy(h2, w, t2, "none", chunk_size=COMPILED_CHUNK, impl="compiled")
        tok.sum().backward()  # an expanded (stride 0) upstream gradient: made contiguous, no new graph
        with torch.no_grad():
            L.cross_entropy(h2, w, t2, "mean", chunk_size=COMPILED_CHUNK, impl="compiled")
    assert _compiled_counts() == before, "a new token count recompiled the per-chunk function"


def test_compiled_bf16_autocast_close_to_chunked():
    """Logits in bf16, reductions in fp32, like the chunked walk; bf16 rounding sets the tolerance."""
    torch.set_num_threads(1)
    outs = []
    for impl in ("chunked", "compiled"):
        h, w, t = _inputs(ignore=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = L.cross_entropy(h, w, t, chunk_size=COMPILED_CHUNK, impl=impl)
        out.backward()
        assert out.dtype == h.grad.dtype == w.grad.dtype == torch.float32
        outs.append((out.detach(), h.grad, w.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------
# choosing the implementation


def test_each_impl_is_listed_once():
    assert tuple(get_args(config.LossImpl)) == L.LOSS_IMPLS
    assert config.ModelConfigSection().loss_impl == "auto"


def test_resolve_loss_impl():
    assert L.resolve_loss_impl("auto", "cpu") == "chunked"
    assert L.resolve_loss_impl("auto", torch.device("cuda")) == "compiled"
    assert L.resolve_loss_impl("liger", "cuda") == "liger"
    assert L.resolve_loss_impl("compiled", "cpu") == "compiled"
    with pytest.raises(ValueError, match="unknown loss implementation 'fast'"):
        L.resolve_loss_impl("fast", "cpu")


def test_recipe_loss_impl_reaches_the_model(monkeypatch):
    from omegaconf import OmegaConf

    from megadoc_pl.model.llama import Llama, LlamaConfig
    from megadoc_pl.recipes import load_recipe

    assert LlamaConfig().loss_impl == "auto"
    recipe = OmegaConf.to_container(load_recipe("baseline_real", ["model.loss_impl=compiled"]))
    cfg = LlamaConfig.from_recipe(recipe)
    assert cfg.loss_impl == "compiled"
    with pytest.raises(Exception, match="loss_impl"):
        load_recipe("baseline_real", ["model.loss_impl=fast"])
    seen, real = [], L.resolve_loss_impl
    monkeypatch.setattr(L, "resolve_loss_impl", lambda impl, device: seen.append(real(impl, device)) or "chunked")
    model = Llama(LlamaConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=32, vocab_size=V,
                              attention_backend="sdpa", loss_impl="compiled"))
    h, _, t = _inputs()
    model.loss(h, t)
    model.cfg.loss_impl = "auto"  # on CPU: the eager walk
    model.loss(h, t)
    assert seen == ["compiled", "chunked"]


def test_liger_on_cpu_names_the_fix():
    from megadoc_pl.model.llama import Llama, LlamaConfig

    model = Llama(LlamaConfig(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=32, vocab_size=V,
                              attention_backend="sdpa", loss_impl="liger"))
    h, _, t = _inputs()
    for reduction in ("mean", "none"):
        with pytest.raises(ValueError, match=r"needs CUDA .* \(fix: set model.loss_impl=auto or chunked\)") as e:
            model.loss(h, t, reduction=reduction)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# GPU: compiled and Liger against the chunked walk at the 300m-class head, bf16 autocast


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["compiled", "liger"])
def test_fast_impls_match_chunked_gpu(impl):
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    Bg, Tg, Dg, Vg = 2, 4096, 1024, 128256
    gen = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(Bg, Tg, Dg, device="cuda", generator=gen)
    w0 = 0.02 * torch.randn(Vg, Dg, device="cuda", generator=gen)
    t = torch.randint(0, Vg, (Bg, Tg), device="cuda", generator=gen)
    t[0, :100] = -100
    for reduction in ("mean", "sum", "none"):
        got = []
        for which in ("chunked", impl):
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = L.cross_entropy(h, w, t, reduction, chunk_size=1024, impl=which)
            (out.sum() if reduction == "none" else out).backward()
            got.append((out.detach().float(), h.grad, w.grad))
        (loss_a, dh_a, dw_a), (loss_b, dh_b, dw_b) = got
        assert loss_b.shape == loss_a.shape and dw_b.dtype == torch.float32
        assert _rel(loss_b, loss_a) < 1e-4, (reduction, _rel(loss_b, loss_a))
        assert _rel(dh_b, dh_a) < 1e-2 and _rel(dw_b, dw_a) < 1e-2, (reduction, _rel(dh_b, dh_a), _rel(dw_b, dw_a))
