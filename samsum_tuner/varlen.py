"""model.attn_implementation=varlen_attn: packed rows through torch's variable-length FlashAttention
(torch.nn.attention.varlen), with neither a mask nor a block layout. The collator finds each row's sample
boundaries on the host (batching.WithSampleBoundaries); the model's forward hands them, as transformers'
cu_seq_lens_* and max_length_* keywords, to the attention function registered here."""
from __future__ import annotations

import inspect
import math

import torch


VARLEN = "varlen_attn"


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def available() -> bool:
    """Whether this torch has varlen_attn (2.9 and later; CUDA only: on a CPU each sample goes through sdpa)."""
    return _varlen_attn() is not None


def _kernel() -> tuple:
    """torch's varlen_attn, its causal keyword (is_causal up to 2.11, window_size after) and what else it takes:
    found once, at registration, so that nothing is imported or inspected inside a compiled layer."""
    fn = _varlen_attn()
    params = set(inspect.signature(fn).parameters)
    return fn, ({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}), params


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q: int | None = None, max_length_k: int | None = None, **kwargs):
    """transformers' attention-function signature: query (1, heads, tokens, dim), key and value (1, kv heads,
    tokens, dim) of one packed row; returns (1, tokens, heads, dim), as sdpa's does, and no weights."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("varlen_attn attends within packed rows only (one row whose sample boundaries come from "
                         "samsum_tuner's collator); generate with attn_implementation=sdpa")
    if dropout:
        raise ValueError("varlen_attn has no attention dropout")
    if not query.is_cuda:  # FlashAttention is CUDA-only: elsewhere each sample through sdpa, causally
        return _per_sample_sdpa(query, key, value, cu_seq_lens_q.tolist(), scaling), None
    fn, causal, params = _KERNEL
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim): FlashAttention's layout
    if q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):  # fp32 weights under bf16/fp16 autocast:
        half = torch.get_autocast_dtype("cuda")  # RoPE left q, k in fp32; FlashAttention takes 16-bit only
        q, k, v = q.to(half), k.to(half), v.to(half)
    extra = dict(causal)
    if k.shape[1] != q.shape[1]:  # grouped-query attention (SmolLM2): torch's own where it has it
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    default = 1 / math.sqrt(q.shape[-1])
    if scaling is not None and "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and scaling != default:  # a torch without `scale`: fold it into the queries
        q = q * (scaling / default)
    out = fn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **extra)
    return out.unsqueeze(0), None


def _per_sample_sdpa(query, key, value, cu: list[int], scaling: float | None):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    parts = [sdpa(query[..., a:b, :], key[..., a:b, :], value[..., a:b, :], is_causal=True, scale=scaling)
             for a, b in zip(cu, cu[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2)


_KERNEL: tuple = (None, {}, set())  # set by register()


def register() -> None:
    """Make VARLEN an attention implementation transformers accepts (from_pretrained, from_config). No mask
    function is registered, so transformers builds no mask for it: the sample boundaries replace one."""
    global _KERNEL
    from transformers import AttentionInterface

    if available():
        _KERNEL = _kernel()
    AttentionInterface.register(VARLEN, varlen_attention_forward)
