"""Building blocks shared by the vision tower and the text decoder: RMSNorm, rotary helpers, the gated MLP,
and attention confined to segments of a packed sequence.

Mirrors transformers' `Qwen2_5_VLRMSNorm`, `rotate_half`, `Qwen2_5_VLMLP` / `Qwen2MLP` (modeling_qwen2_5_vl.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = w * (x / rms(x)). Normalise in fp32, cast back to the input dtype, *then* multiply by the weight:
    the order transformers uses, which matters in bf16 (qwen25vl.md pitfall §7.7)."""

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
    return x * cos + rotate_half(x) * sin


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): SwiGLU. The vision blocks use biases, the text layers do not."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Non-causal attention inside each segment [cu[i], cu[i+1]) of a packed sequence, never across segments.

    q, k, v: (N, H, Dh) -> (N, H, Dh). transformers loops over segments (or uses FA2 varlen); here the segments are
    gathered into one padded batch (S, H, M, Dh) and run through a single SDPA call with a key-padding mask, which
    is the same maths in one kernel launch. Every segment is non-empty, so no row is fully masked.
    """
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
    max_len = int(lengths.max())
    offsets = torch.arange(max_len, device=q.device)  # (M,)
    valid = offsets[None, :] < lengths[:, None]  # (S, M)
    index = (cu_seqlens[:-1, None] + offsets[None, :]).clamp(max=q.shape[0] - 1)  # (S, M) token ids
    pad = lambda t: t[index].transpose(1, 2)  # (S, M, H, Dh) -> (S, H, M, Dh)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[valid]  # (S, M, H, Dh) -> (N, H, Dh), original order
