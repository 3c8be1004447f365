"""Grouped key/value heads reach PyTorch's varlen kernel as they are wherever it takes them (workbench/fastpath/varlen_kernel.py).

The kernel runs only on CUDA; here `torch.nn.attention.varlen.varlen_attn` is replaced by
stand-ins with the signatures of the torch versions (2.11: no `enable_gqa`; 2.13: the
flag) and the behaviours a backend can have with fewer key/value heads than query heads:
attending the groups itself, refusing them, or getting them wrong.
"""
import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
import torch.nn.functional as F

from workbench.fastpath import varlen_kernel


def _attend(q, k, v, cu, scale=None, wrong=False):
    """Causal attention within each conversation, grouped heads attended as groups (or, `wrong`, all by the first)."""
    if k.shape[1] != q.shape[1]:
        k, v = (t[:, :1].expand(-1, q.shape[1], -1) if wrong else t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)
                for t in (k, v))
    bounds = cu.tolist()
    return torch.cat([F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                     v[s:e].transpose(0, 1), is_causal=True, scale=scale).transpose(0, 1)
                      for s, e in zip(bounds[:-1], bounds[1:])])


def kernel_2_11(behaviour: str, seen: list):
    """varlen_attn as torch 2.11 spells it (window_size, no enable_gqa), recording the key/value heads it gets."""
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        assert window_size == (-1, 0), "causal"
        seen.append(key.shape[1])
        if behaviour == "refuses" and key.shape[1] != query.shape[1]:
            raise RuntimeError("Number of heads in key/value must equal the query's")
        return _attend(query, key, value, cu_seq_q, scale, wrong=behaviour == "wrong")
    return varlen_attn


def kernel_2_13(seen: list):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        seen.append((key.shape[1], enable_gqa))
        assert enable_gqa or key.shape[1] == query.shape[1]
        return _attend(query, key, value, cu_seq_q, scale)
    return varlen_attn


@pytest.fixture
def use_kernel(monkeypatch):
    """Install a stand-in kernel, with the module's caches cleared before and after."""
    varlen_kernel.attention_call.cache_clear()
    monkeypatch.setattr(varlen_kernel, "_NATIVE_GQA", {})

    def install(kernel):
        monkeypatch.setattr(torch_varlen, "varlen_attn", kernel)
    yield install
    varlen_kernel.attention_call.cache_clear()


def _batch():
    draw = torch.Generator().manual_seed(1)
    q = torch.randn(30, 6, 16, generator=draw, dtype=torch.bfloat16)
    k, v = (torch.randn(30, 2, 16, generator=draw, dtype=torch.bfloat16) for _ in range(2))
    return q, k, v, torch.tensor([0, 7, 19, 30], dtype=torch.int32)


def test_a_kernel_that_attends_groups_gets_the_heads_as_they_are(use_kernel):
    seen = []
    use_kernel(kernel_2_11("native", seen))
    assert varlen_kernel.kernel_takes_gqa("cpu") and seen == [2, 4], "probed once: grouped, then repeated"
    q, k, v, cu = _batch()
    out = varlen_kernel.attention_call()(q, k, v, cu, 12, None)
    assert seen[-1] == 2, "the 2 key/value heads, not 6 repeated ones"
    torch.testing.assert_close(out, _attend(q, k, v, cu))
    assert varlen_kernel.kernel_takes_gqa(torch.device("cpu")) and len(seen) == 3, "the probe is not run again"


@pytest.mark.parametrize("behaviour", ["refuses", "wrong"])
def test_a_kernel_that_refuses_or_mistakes_groups_gets_them_repeated(use_kernel, behaviour):
    seen = []
    use_kernel(kernel_2_11(behaviour, seen))
    assert not varlen_kernel.kernel_takes_gqa("cpu")
    q, k, v, cu = _batch()
    out = varlen_kernel.attention_call()(q, k, v, cu, 12, None)
    assert seen[-1] == 6, "the key/value heads repeated to the query's"
    torch.testing.assert_close(out, _attend(q, k, v, cu))


def test_an_unprobed_device_keeps_the_repetition(use_kernel):
    seen = []
    use_kernel(kernel_2_11("native", seen))
    q, k, v, cu = _batch()
    varlen_kernel.attention_call()(q, k, v, cu, 12, None)
    assert seen == [6], "no probe inside a forward: repeated until setup found the kernel taking groups"


def test_torch_2_13_is_asked_with_its_flag_and_never_probed(use_kernel):
    seen = []
    use_kernel(kernel_2_13(seen))
    assert varlen_kernel.kernel_takes_gqa("cpu") and seen == []
    q, k, v, cu = _batch()
    torch.testing.assert_close(varlen_kernel.attention_call()(q, k, v, cu, 12, None), _attend(q, k, v, cu))
    assert seen == [(2, True)]
    varlen_kernel.attention_call()(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), cu, 12, None)
    assert seen[-1] == (6, False)
