"""Attention backends against the dense oracle and a per-segment loop."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from megadoc_pl.model import attention as A

B, T, H, KV, D = 2, 40, 4, 2, 8


def _qkv(kv: int = KV, seed: int = 0, dtype=torch.float32, device="cpu", d: int = D):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g).to(device, dtype)
    k = torch.randn(B, T, kv, d, generator=g).to(device, dtype)
    v = torch.randn(B, T, kv, d, generator=g).to(device, dtype)
    return q, k, v


# Row 0: document scope with three segments; row 1: two segments (a megadoc-like split).
SEG = torch.tensor([[0] * 7 + [1] * 20 + [2] * 13, [0] * 25 + [1] * 15], dtype=torch.int32)
CU = torch.tensor([0, 7, 27, 40, 65, 80], dtype=torch.int32)


def _per_segment_loop(q, k, v, seg_BT):
    """Oracle 2: plain causal attention run on each segment alone, with repeated KV heads."""
    rep = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        for s in seg_BT[b].unique():
            idx = (seg_BT[b] == s).nonzero().flatten()
            qs, ks, vs = (x[b, idx].transpose(0, 1)[None] for x in (q, k, v))
            ks, vs = ks.repeat_interleave(rep, 1), vs.repeat_interleave(rep, 1)
            out[b, idx] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
    return out


def test_segment_descriptions_round_trip():
    seg = A.segment_ids_from_cu_seqlens(CU, B, T)
    assert seg.tolist() == [[0] * 7 + [1] * 20 + [2] * 13, [3] * 25 + [4] * 15]
    cu, max_len = A.cu_seqlens_from_segment_ids(SEG)
    assert cu.tolist() == CU.tolist() and max_len == 25
    pos = A.positions_from_segment_ids(SEG)
    assert pos[0].tolist() == list(range(7)) + list(range(20)) + list(range(13))
    assert pos[1].tolist() == list(range(25)) + list(range(15))
    # window scope: one segment per row, cut at the row boundary
    cu, max_len = A.cu_seqlens_from_segment_ids(torch.zeros(B, T, dtype=torch.int32))
    assert cu.tolist() == [0, T, 2 * T] and max_len == T


@pytest.mark.parametrize("kv", [KV, H])
def test_sdpa_matches_per_segment_loop(kv):
    q, k, v = _qkv(kv)
    out = A.attention(q, k, v, segment_ids=SEG, backend="sdpa")
    torch.testing.assert_close(out, _per_segment_loop(q, k, v, SEG), atol=1e-5, rtol=1e-5)
    # the same segmentation given only as cu_seqlens
    out_cu = A.attention(q, k, v, cu_seqlens=CU, max_seqlen=25, backend="sdpa")
    torch.testing.assert_close(out_cu, out, atol=0, rtol=0)


def test_segments_change_the_output():
    q, k, v = _qkv()
    masked = A.attention(q, k, v, segment_ids=SEG, backend="sdpa")
    window = A.attention(q, k, v, backend="sdpa")
    assert not torch.allclose(masked[:, 8:], window[:, 8:], atol=1e-3)
    torch.testing.assert_close(masked[0, :7], window[0, :7])  # first segment sees the same keys


def test_single_segment_fast_path_equals_explicit_mask():
    q, k, v = _qkv()
    fast = A.attention(q, k, v, segment_ids=torch.full((B, T), 3), backend="sdpa")
    mask = A.AttentionMask("sdpa", B, T, single_segment_rows=False,
                           dense_B1TT=torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T))
    torch.testing.assert_close(fast, A.attention(q, k, v, mask=mask), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, A.attention(q, k, v, backend="sdpa"), atol=0, rtol=0)


def test_gqa_equals_repeated_kv():
    q, k, v = _qkv(KV)
    rep = H // KV
    gqa = A.attention(q, k, v, segment_ids=SEG, backend="sdpa")
    mha = A.attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), segment_ids=SEG, backend="sdpa")
    torch.testing.assert_close(gqa, mha, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seg", [None, "zeros", "doc"])
def test_flex_matches_sdpa_on_cpu(seg):
    q, k, v = _qkv()
    segment_ids = {None: None, "zeros": torch.zeros(B, T, dtype=torch.int32), "doc": SEG}[seg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = A.attention(q, k, v, segment_ids=segment_ids, backend="flex")
    ref = A.attention(q, k, v, segment_ids=segment_ids, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_with_cu_seqlens_only():
    q, k, v = _qkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = A.attention(q, k, v, cu_seqlens=CU, max_seqlen=25, backend="flex")
    torch.testing.assert_close(out, _per_segment_loop(q, k, v, SEG), atol=1e-5, rtol=1e-5)


def test_auto_is_sdpa_on_cpu_and_errors_are_clear():
    assert A.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert A.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.resolve_backend("xformers", torch.device("cpu"), torch.float32)
    for backend in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            A.attention(*_qkv(), segment_ids=SEG, backend=backend)
    with pytest.raises(ValueError, match="row boundary"):
        A.segment_ids_from_cu_seqlens(torch.tensor([0, 30, 80], dtype=torch.int32), B, T)
    with pytest.raises(ValueError, match="end at B\\*T"):
        A.segment_ids_from_cu_seqlens(torch.tensor([0, 40, 70], dtype=torch.int32), B, T)
    with pytest.raises(ValueError, match="non-decreasing"):
        A.cu_seqlens_from_segment_ids(torch.tensor([[0, 0, 1, 1, 0]]))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        A.attention(*_qkv(), segment_ids=SEG[:, :10], backend="sdpa")


# ---------------------------------------------------------------------------------------------
# varlen code paths on CPU: the real kernels need CUDA, so a reference varlen function stands in
# for them and checks what our wrapper passes (packed layout, int32 offsets, causal flag, GQA).


def _reference_varlen(q_NHD, k_NKD, v_NKD, cu, max_len):
    assert q_NHD.dim() == 3 and cu.dtype == torch.int32
    lengths = (cu[1:] - cu[:-1]).tolist()
    assert max(lengths) == max_len
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    return _per_segment_loop(q_NHD[None], k_NKD[None], v_NKD[None], seg)[0]


def test_flash_attn_wrapper_contract(monkeypatch):
    calls = {}

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
        calls.update(causal=causal, same=cu_q is cu_k, heads=(q.shape[1], k.shape[1]))
        return _reference_varlen(q, k, v, cu_q, max_q)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func))
    q, k, v = _qkv()
    cu, max_len = A.varlen_metadata(B, T, q.device, segment_ids=SEG)
    mask = A.AttentionMask("flash_attn", B, T, False, cu_seqlens=cu, max_seqlen=max_len)
    out = A.attention(q, k, v, mask=mask)
    assert calls == {"causal": True, "same": True, "heads": (H, KV)}
    torch.testing.assert_close(out, A.attention(q, k, v, segment_ids=SEG, backend="sdpa"), atol=1e-5, rtol=1e-5)


def test_torch_varlen_wrapper_contract(monkeypatch):
    import torch.nn.attention.varlen as varlen

    calls = {}

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, **kw):
        calls.update(window_size=tuple(window_size), enable_gqa=enable_gqa)
        return _reference_varlen(q, k, v, cu_q, max_q)

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    q, k, v = _qkv()
    # cu_seqlens straight from the batch; window scope when none is given
    for seg_kw, oracle_seg in (({"cu_seqlens": CU}, SEG), ({}, None)):
        cu, max_len = A.varlen_metadata(B, T, q.device, **seg_kw)
        mask = A.AttentionMask("torch_varlen", B, T, False, cu_seqlens=cu, max_seqlen=max_len)
        out = A.attention(q, k, v, mask=mask)
        assert calls == {"window_size": (-1, 0), "enable_gqa": True}  # (-1, 0) = causal
        torch.testing.assert_close(out, A.attention(q, k, v, segment_ids=oracle_seg, backend="sdpa"), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels in bf16 against the fp32 dense oracle, forward and backward


def _gpu_check(backend: str):
    dev = "cuda"
    q, k, v = (x.requires_grad_() for x in _qkv(dtype=torch.bfloat16, device=dev, d=64))  # kernel-friendly head dim
    seg = SEG.to(dev)
    out = A.attention(q, k, v, segment_ids=seg, cu_seqlens=CU.to(dev), max_seqlen=25, backend=backend)
    q2, k2, v2 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = A.attention(q2, k2, v2, segment_ids=seg, backend="sdpa")
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(ref)
    out.float().backward(g)
    ref.backward(g)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.float(), b.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_matches_sdpa_gpu():
    pytest.importorskip("flash_attn")
    _gpu_check("flash_attn")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_varlen_matches_sdpa_gpu():
    if not A.has_torch_varlen():
        pytest.skip("torch has no varlen_attn")
    _gpu_check("torch_varlen")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_sdpa_gpu():
    _gpu_check("flex")
