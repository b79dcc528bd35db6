"""Attention backends against the dense oracle and a per-segment loop."""

from __future__ import annotations

import dataclasses
import inspect
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


def _mask(backend: str, seg=None, dtype=torch.float32, **kw) -> A.AttentionMask:
    """The mask of SEG-like segment ids (None: plain causal rows) as the model builds it."""
    if seg is None:
        return A.causal_mask(backend, B, T, torch.device("cpu"), dtype)
    return A.segment_mask(backend, seg, dtype, **kw)


def test_segment_descriptions_round_trip():
    cu, max_len = A.cu_seqlens_from_segment_ids(SEG)
    assert cu.tolist() == CU.tolist() and max_len == 25
    pos = A.positions_from_segment_ids(SEG)
    assert pos[0].tolist() == list(range(7)) + list(range(20)) + list(range(13))
    assert pos[1].tolist() == list(range(25)) + list(range(15))
    # window scope: one segment per row, cut at the row boundary
    cu, max_len = A.cu_seqlens_from_segment_ids(torch.zeros(B, T, dtype=torch.int32))
    assert cu.tolist() == [0, T, 2 * T] and max_len == T
    # the batch's offsets are taken (checked, int32) rather than derived; max_seqlen from them if absent
    for cu, max_len in (A.varlen_offsets(SEG, CU.long(), 25), A.varlen_offsets(SEG, CU)):
        assert cu.dtype == torch.int32 and cu.tolist() == CU.tolist() and max_len == 25


def test_masks_carry_positions_and_the_backends_preparation():
    seg = _mask("sdpa", SEG)
    assert seg.shape == (B, T) and not seg.single_segment_rows and seg.dense_B1TT.shape == (B, 1, T, T)
    assert torch.equal(seg.positions_BT, A.positions_from_segment_ids(SEG))
    plain = _mask("sdpa")
    assert plain.single_segment_rows and plain.dense_B1TT is None and plain.segment_ids_BT is None
    assert plain.positions_BT.tolist() == [list(range(T))] * B
    one_each = _mask("sdpa", torch.full((B, T), 3))
    assert one_each.single_segment_rows and one_each.dense_B1TT is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _mask("flex", SEG).block_mask is not None and _mask("flex").block_mask is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        seg.backend = "flex"


@pytest.mark.parametrize("kv", [KV, H])
def test_sdpa_matches_per_segment_loop(kv):
    q, k, v = _qkv(kv)
    out = A.attention(q, k, v, _mask("sdpa", SEG))
    torch.testing.assert_close(out, _per_segment_loop(q, k, v, SEG), atol=1e-5, rtol=1e-5)
    # the batch's cu_seqlens alongside change nothing
    out_cu = A.attention(q, k, v, _mask("sdpa", SEG, cu_seqlens=CU, max_seqlen=25))
    torch.testing.assert_close(out_cu, out, atol=0, rtol=0)


def test_segments_change_the_output():
    q, k, v = _qkv()
    masked = A.attention(q, k, v, _mask("sdpa", SEG))
    window = A.attention(q, k, v, _mask("sdpa"))
    assert not torch.allclose(masked[:, 8:], window[:, 8:], atol=1e-3)
    torch.testing.assert_close(masked[0, :7], window[0, :7])  # first segment sees the same keys


def test_single_segment_fast_path_equals_explicit_mask():
    q, k, v = _qkv()
    fast = A.attention(q, k, v, _mask("sdpa", torch.full((B, T), 3)))
    explicit = A.AttentionMask("sdpa", A.positions_from_segment_ids(torch.zeros(B, T)), single_segment_rows=False,
                               dense_B1TT=torch.ones(T, T, dtype=torch.bool).tril().expand(B, 1, T, T))
    torch.testing.assert_close(fast, A.attention(q, k, v, explicit), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast, A.attention(q, k, v, _mask("sdpa")), atol=0, rtol=0)


def test_gqa_equals_repeated_kv():
    q, k, v = _qkv(KV)
    rep = H // KV
    mask = _mask("sdpa", SEG)
    gqa = A.attention(q, k, v, mask)
    mha = A.attention(q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2), mask)
    torch.testing.assert_close(gqa, mha, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seg", [None, "zeros", "doc"])
def test_flex_matches_sdpa_on_cpu(seg):
    q, k, v = _qkv()
    segment_ids = {None: None, "zeros": torch.zeros(B, T, dtype=torch.int32), "doc": SEG}[seg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        out = A.attention(q, k, v, _mask("flex", segment_ids))
    ref = A.attention(q, k, v, _mask("sdpa", segment_ids))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if seg == "doc":
        torch.testing.assert_close(out, _per_segment_loop(q, k, v, SEG), atol=1e-5, rtol=1e-5)


def test_auto_is_sdpa_on_cpu_and_errors_are_clear():
    assert A.resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert A.resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.resolve_backend("xformers", torch.device("cpu"), torch.float32)
    for backend in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            _mask(backend, SEG)
        with pytest.raises(ValueError, match="needs a CUDA device"):
            _mask(backend)
    with pytest.raises(ValueError, match="row boundary"):
        A.varlen_offsets(SEG, torch.tensor([0, 30, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at B\\*T"):
        A.varlen_offsets(SEG, torch.tensor([0, 40, 70], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        A.varlen_offsets(SEG, torch.tensor([0, 40, 40, 80], dtype=torch.int32))
    with pytest.raises(ValueError, match="non-decreasing"):
        A.cu_seqlens_from_segment_ids(torch.tensor([[0, 0, 1, 1, 0]]))
    with pytest.raises(ValueError, match="must be \\(B, T\\)"):
        _mask("sdpa", SEG[0])
    with pytest.raises(ValueError, match="mask was built for"):
        A.attention(*_qkv(), _mask("sdpa", SEG[:, :10]))


# ---------------------------------------------------------------------------------------------
# no host sync per micro-batch: on the meta device nothing can be read back (.item(), bool() raise),
# as on a GPU nothing should be; the real check, with CUDA's sync debug mode, is gpu-marked below


@pytest.fixture
def any_backend_on_meta(monkeypatch):
    """Let every backend build its mask on the meta device (resolution would ask for CUDA)."""
    monkeypatch.setattr(A, "resolve_backend", lambda backend, device, dtype: backend)
    monkeypatch.setattr(A, "torch_varlen_keywords", lambda: {"is_causal": True})


@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn", "torch_varlen"])
def test_masks_from_the_batch_offsets_read_nothing_back(any_backend_on_meta, backend):
    meta = torch.device("meta")
    rows_cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
    for seg, cu, single in ((SEG, CU, False), (torch.zeros(B, T, dtype=torch.int32), rows_cu, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = A.segment_mask(backend, seg.to(meta), torch.bfloat16, cu.to(meta), 25)
            no_max = A.segment_mask(backend, seg.to(meta), torch.bfloat16, cu.to(meta))
        assert mask.single_segment_rows == no_max.single_segment_rows == single  # from the offsets' length
        if backend in ("flash_attn", "torch_varlen"):
            assert mask.max_seqlen == 25 and no_max.max_seqlen == T  # the row length bounds it unread
    # what does read back: deriving the segmentation from the ids, and validate=True
    with pytest.raises(RuntimeError, match="meta"):
        A.segment_mask(backend, SEG.to(meta), torch.bfloat16)
    with pytest.raises(RuntimeError, match="meta"):
        A.segment_mask(backend, SEG.to(meta), torch.bfloat16, CU.to(meta), 25, validate=True)


def test_offsets_are_checked_where_that_is_free():
    bad = torch.tensor([0, 30, 80], dtype=torch.int32)
    for backend in ("sdpa", "flex"):  # on the CPU the batch's offsets are checked, whatever the backend
        with pytest.raises(ValueError, match="row boundary"):
            A.segment_mask(backend, SEG, torch.float32, bad)
    # the shape is checked everywhere: too few offsets for the rows, or not 1-D
    with pytest.raises(ValueError, match="2 segments for 3 rows"):
        A.varlen_offsets(torch.zeros(3, T, dtype=torch.int32), CU[:3])
    with pytest.raises(ValueError, match="1-D tensor"):
        A.varlen_offsets(SEG, CU[None])
    # max_seqlen from CPU offsets is exact
    assert A.varlen_offsets(SEG, CU)[1] == 25


def test_flex_block_masks_are_built_without_the_deprecated_flag(monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask

    assert A._compiled_create_block_mask() is A._compiled_create_block_mask()  # one compiled builder
    assert A._compiled_create_block_mask()._torchdynamo_orig_callable is create_block_mask
    calls = []
    monkeypatch.setattr(A, "_compiled_create_block_mask", lambda: lambda *a, **kw: calls.append((a, kw)) or "built")
    assert A._flex_block_mask(SEG, B, T, torch.device("cuda")) == "built"  # CUDA: the compiled builder
    [(args, kw)] = calls
    # five positional arguments and device=: create_block_mask takes them in every torch since 2.5
    # (2.11 and 2.13 included), and nothing else is passed (no _compile)
    assert len(args) == 5 and set(kw) == {"device"}
    inspect.signature(create_block_mask).bind(*args, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert A._flex_block_mask(SEG, B, T, torch.device("cpu")) is not None  # CPU: eager
    assert calls == [(args, kw)]


def test_causal_block_mask_is_built_once_and_serves_training_after_inference():
    A._causal_block_mask.cache_clear()
    with torch.inference_mode():  # Lightning validates in inference mode, possibly before the first step
        first = _mask("flex").block_mask
    assert _mask("flex").block_mask is first and A.segment_mask("flex", torch.zeros(B, T), torch.float32,
                                                                  torch.tensor([0, T, 2 * T])).block_mask is first
    # inference tensors could not be saved for a training step's backward (flex has none on CPU to run)
    tensors = [t for t in first.as_tuple() if isinstance(t, torch.Tensor)]
    assert tensors and not any(t.is_inference() for t in tensors)


# ---------------------------------------------------------------------------------------------
# varlen kernels: the real ones need CUDA (below). On CPU, the flash_attn wrapper is checked against
# a stand-in, and torch_varlen's keywords against the installed torch's own signature.


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
    cu, max_len = A.varlen_offsets(SEG)
    mask = A.AttentionMask("flash_attn", A.positions_from_segment_ids(SEG), False, SEG, cu_seqlens=cu,
                           max_seqlen=max_len)
    out = A.attention(q, k, v, mask)
    assert calls == {"causal": True, "same": True, "heads": (H, KV)}
    torch.testing.assert_close(out, A.attention(q, k, v, _mask("sdpa", SEG)), atol=1e-5, rtol=1e-5)


def test_torch_varlen_keywords_fit_the_installed_signature():
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    signature = inspect.signature(varlen.varlen_attn)
    params = signature.parameters
    kw = A.torch_varlen_keywords()
    gqa = {"enable_gqa": False} if "enable_gqa" in params else {}  # the call sets it True for GQA only
    if "window_size" in params:
        assert kw == {"window_size": (-1, 0), **gqa}  # (-1, 0) = causal
    else:
        assert kw == {"is_causal": True, **gqa}
    # _torch_varlen's calls: (q, k, v, cu_q, cu_k, max_q, max_k) positionally, the keywords after;
    # the seven are exactly the parameters without defaults, so none lands on an option
    assert [n for n, p in params.items() if p.default is inspect.Parameter.empty] == list(params)[:7]
    q = torch.zeros(B * T, H, D)
    for call_kw in (kw, {**kw, **{k: True for k in gqa}}):
        signature.bind(q, q, q, CU, CU, 25, 25, **call_kw)


@pytest.mark.parametrize("params, expected", [
    ({"is_causal", "return_aux"}, {"is_causal": True}),
    ({"return_aux", "scale", "window_size", "enable_gqa"}, {"window_size": (-1, 0), "enable_gqa": False}),
    ({"return_aux", "scale"}, None),
    (None, None),
])
def test_torch_varlen_gate_follows_the_signature(monkeypatch, params, expected):
    monkeypatch.setattr(A, "_varlen_attn_parameters", lambda: None if params is None else frozenset(params))
    if expected is None:
        with pytest.raises(ValueError, match="no torch.nn.attention.varlen" if params is None else "cannot run causal"):
            A.torch_varlen_keywords()
    else:
        assert A.torch_varlen_keywords() == expected
    # auto takes torch_varlen only when it can do causal GQA
    assert A._torch_varlen_complete() == (expected is not None and "enable_gqa" in expected)


# ---------------------------------------------------------------------------------------------
# GPU: the real kernels in bf16 against the fp32 dense oracle, forward and backward


def _gpu_check(backend: str, kv: int = KV):
    dev = "cuda"
    q, k, v = (x.requires_grad_() for x in _qkv(kv, dtype=torch.bfloat16, device=dev, d=64))  # kernel-friendly head dim
    seg = SEG.to(dev)
    out = A.attention(q, k, v, A.segment_mask(backend, seg, torch.bfloat16, CU.to(dev), 25))
    q2, k2, v2 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = A.attention(q2, k2, v2, A.segment_mask("sdpa", seg, torch.float32))
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
@pytest.mark.parametrize("kv", [H, KV], ids=["mha", "gqa"])
def test_torch_varlen_matches_sdpa_gpu(kv):
    if not A.has_torch_varlen():
        pytest.skip("torch has no varlen_attn")
    if kv != H and "enable_gqa" not in A.torch_varlen_keywords():
        pytest.skip(f"this torch's ({torch.__version__}) varlen_attn takes no enable_gqa (added after torch 2.11)")
    _gpu_check("torch_varlen", kv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flex_matches_sdpa_gpu():
    _gpu_check("flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn", "torch_varlen"])
def test_masks_from_the_batch_offsets_do_not_sync_gpu(backend):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    if backend == "torch_varlen":
        try:
            A.torch_varlen_keywords()
        except ValueError as e:
            pytest.skip(str(e))
    dev = torch.device("cuda")
    batches = [(SEG.to(dev), CU.to(dev), 25),
               (torch.zeros(B, T, dtype=torch.int32, device=dev), torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev), T)]

    def build():
        for seg, cu, max_len in batches:
            A.segment_mask(backend, seg, torch.bfloat16, cu, max_len)
        A.causal_mask(backend, B, T, dev, torch.bfloat16)

    build()  # the first batch compiles the flex builder and caches the causal mask: syncs allowed once
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build()  # every later micro-batch
    finally:
        torch.cuda.set_sync_debug_mode(previous)
