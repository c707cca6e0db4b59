"""Building blocks shared by the vision tower and the text decoder: RMSNorm, rotary helpers, the gated MLP,
and attention confined to segments of a packed sequence.

Mirrors transformers' `Qwen2_5_VLRMSNorm`, `rotate_half`, `Qwen2_5_VLMLP` / `Qwen2MLP` (modeling_qwen2_5_vl.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)). Normalise in fp32, cast back to the input dtype, *then* multiply by the weight:
    the order transformers uses, which matters in bf16 (docs/qwen25vl.md pitfall §7.7)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (the "halves" RoPE convention, not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the last dim of x, cos/sin broadcast to it (transformers `apply_rotary_pos_emb`)."""
    return x * cos + rotate_half(x) * sin


def row_bucket(m: int) -> int:
    """m rounded up to a multiple of 32, and of 1/8 of m's power of two: few distinct sizes, at most 1/8 padding."""
    step = max(32, 1 << max(0, m.bit_length() - 4))
    return -(-m // step) * step


def rowwise(fn, x: torch.Tensor):
    """fn(x) for a row-wise fn (linears, MLPs: row i of the output depends on row i of x (..., K) alone), returning a
    tensor or a tuple of tensors (..., N). At inference on a CPU in a 16-bit dtype, fn runs on the rows padded with
    zeros to `row_bucket(rows)`: oneDNN, which runs those matmuls, builds a primitive for every new input shape (a
    cost that grows with the rows, like the product itself) and caches it by shape, so documents of ever new lengths
    would pay it in nearly every call (docs/experiments.md). Elsewhere (fp32: MKL; a GPU; training) x goes as is."""
    m = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or torch.is_grad_enabled() \
            or row_bucket(m) == m:
        return fn(x)
    padded = x.new_empty(row_bucket(m), x.shape[-1])  # (M', K)
    padded[:m] = x.reshape(m, -1)
    padded[m:].zero_()  # zeros, not garbage: oneDNN reads a row's K-tail past its end and relies on 0 * x = 0
    out = fn(padded)  # (M', N) or a tuple of them
    cut = lambda y: y[:m].view(*x.shape[:-1], y.shape[-1])  # (M', N) -> (..., N): the first M rows are a view
    return tuple(map(cut, out)) if isinstance(out, tuple) else cut(out)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): SwiGLU. The vision blocks use biases, the text layers do not."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        # inference: the same product in gate's buffer, two fresh (..., hidden) buffers fewer (docs/experiments.md);
        # the rows padded once for all three matmuls
        return rowwise(lambda h: self.down_proj(F.silu(self.gate_proj(h), inplace=True).mul_(self.up_proj(h))), x)


def segments_by_length(cu_seqlens: torch.Tensor) -> list:
    """Host-side plan for `segment_attention`: the segments [cu[i], cu[i+1]) of a packed sequence bucketed by
    length, as [(n, L, rows)] with rows the n*L row ids of those n segments of length L, in order (a slice when they
    are one contiguous run, else a (n*L,) long tensor). Computed once per forward, shared by every block."""
    bounds = cu_seqlens.tolist()
    by_len = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        by_len.setdefault(b - a, []).append(a)
    buckets = []
    for L, starts in by_len.items():
        n = len(starts)
        if starts == list(range(starts[0], starts[0] + n * L, L)):  # a contiguous run: a view, no gather
            rows = slice(starts[0], starts[0] + n * L)
        else:
            first = torch.tensor(starts, device=cu_seqlens.device)
            rows = (first[:, None] + torch.arange(L, device=cu_seqlens.device)).flatten()  # (n*L,)
        buckets.append((n, L, rows))
    return buckets


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: list) -> torch.Tensor:
    """Non-causal attention inside each segment of a packed sequence, never across segments.

    q, k, v: (N, H, Dh) -> (N, H, Dh); `buckets` from `segments_by_length(cu_seqlens)`. transformers loops over segments
    (or uses FA2 varlen). Here the segments of one length run as one batch: one SDPA call per distinct length, with
    no padding and no mask (most windows are full 8x8 = 64 patches; full attention has one segment per image, and
    padding mixed image sizes to the largest would waste quadratic work).
    """
    _, H, Dh = q.shape
    out = torch.empty_like(q)
    for n, L, rows in buckets:
        pick = lambda t: t[rows].view(n, L, H, Dh).transpose(1, 2)  # (n, H, L, Dh)
        o = F.scaled_dot_product_attention(pick(q), pick(k), pick(v))  # (n, H, L, Dh)
        out[rows] = o.transpose(1, 2).reshape(n * L, H, Dh)
    return out
