"""The Qwen2.5-VL vision tower (a ViT with 2-D RoPE and window attention) and its 2x2 patch merger (the projector).

Mirrors transformers `Qwen2_5_VisionTransformerPretrainedModel` (modeling_qwen2_5_vl.py) and the helpers in
transformers/vision_utils.py; the steps are numbered as in docs/qwen25vl.md §3.

Input is *packed*: every image of a batch is one run of rows in `pixel_values` (N, C*T*P*P = 1176), described by
`grid_thw` (n_images, 3) in patch units. Rows come from the processor already ordered by 2x2 merge block
(TL, TR, BL, BR), so "merge 4 consecutive rows" is the projector.
Output: (N / 4, out_hidden_size), one LLM token per 2x2 block, in raster order per image.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig
from .layers import GatedMLP, RMSNorm, apply_rotary, rowwise, segments_by_length, segment_attention


# ----------------------------------------------------------------------------- index helpers (no parameters)
def rotary_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch, in the processor's row order: 2x2 blocks row-major, patches in a block row-major.
    Mirrors transformers `get_vision_position_ids`. Returns (N, 2) long."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h, device=grid_thw.device)[:, None].expand(h, w)  # (h, w)
        cols = torch.arange(w, device=grid_thw.device)[None, :].expand(h, w)
        blocks = lambda x: x.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten()  # block order
        out.append(torch.stack([blocks(rows), blocks(cols)], dim=-1).repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(out)


def window_index(grid_thw: torch.Tensor, merge: int, window_tokens: int):
    """Permutation of the merged tokens into window order, and window boundaries in patch units.

    Per image the llm grid (t, H, W) is padded bottom/right to a multiple of `window_tokens` (4 for the official
    112-px window) — with the upstream quirk that an exact multiple still gets a full extra pad row/column — cut into
    windows (row-major), tokens row-major inside each window; pads are dropped. Empty windows from the quirk give
    repeated boundaries, removed by `unique_consecutive` (docs/qwen25vl.md §3 step 3, pitfall §7.3).
    Mirrors transformers `get_vision_window_index`. Returns (N/4,) long and (n_windows+1,) int32.
    """
    index, cu, offset = [], [torch.zeros(1, dtype=torch.long)], 0
    ws, unit = window_tokens, merge * merge
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        pad_h, pad_w = ws - gh % ws, ws - gw % ws  # always >= 1: the quirk
        ids = torch.arange(t * gh * gw).reshape(t, gh, gw)
        ids = F.pad(ids, (0, pad_w, 0, pad_h), value=-1)  # (t, gh+pad_h, gw+pad_w)
        nh, nw = (gh + pad_h) // ws, (gw + pad_w) // ws
        ids = ids.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, ws * ws)  # (windows, ws*ws)
        counts = (ids >= 0).sum(-1)  # tokens per window, 0 for the quirk's empty windows
        index.append(ids[ids >= 0] + offset)
        cu.append(counts.cumsum(0) * unit + cu[-1][-1])
        offset += t * gh * gw
    cu = torch.unique_consecutive(torch.cat(cu)).to(torch.int32)
    return torch.cat(index).to(grid_thw.device), cu.to(grid_thw.device)


def image_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Boundaries of full attention: each frame of each image is one segment (never across images)."""
    lengths = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


# ----------------------------------------------------------------------------- modules
class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # rows: [q (heads x Dh); k; v]
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, segments):
        n = x.shape[0]
        qkv = rowwise(self.qkv, x).reshape(n, 3, self.num_heads, -1)  # (N, 3, H, Dh)
        v = qkv[:, 2]
        # rotary in fp32 then back, as `apply_rotary_pos_emb_vision` (docs/qwen25vl.md pitfall §7.4); q and k in one
        # call (half the elementwise kernels): cos/sin (N, 1, Dh) -> (N, 1, 1, Dh) broadcast over q/k and heads
        q, k = apply_rotary(qkv[:, :2].float(), cos[:, None], sin[:, None]).to(v.dtype).unbind(1)  # 2 x (N, H, Dh)
        out = segment_attention(q, k, v, segments)  # (N, H, Dh)
        return rowwise(self.proj, out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """The projector: RMSNorm each patch, concatenate the 4 patches of a 2x2 block, MLP to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        wide = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # checkpoint: merger.ln_q
        self.fc1 = nn.Linear(wide, wide)  # merger.mlp.0
        self.fc2 = nn.Linear(wide, cfg.out_hidden_size)  # merger.mlp.2

    def forward(self, x):  # (N, D) -> (N/4, out)
        x = self.norm(x).reshape(-1, self.fc1.in_features)  # (N/4, 4*D): TL, TR, BL, BR concatenated
        return rowwise(lambda h: self.fc2(F.gelu(self.fc1(h))), x)  # exact (erf) GELU


class PatchEmbed(nn.Module):
    """Conv3d(C -> D, kernel = stride = (T, P, P), no bias) on one patch per row == a Linear on the flattened row.
    The weight keeps the checkpoint's Conv3d layout (D, C, T, P, P) so loading is pure renaming."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size,
                                               cfg.patch_size, cfg.patch_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, pixel_values):  # (N, C*T*P*P) -> (N, D); the row layout is (C, T, P, P), as the weight's
        return rowwise(lambda p: F.linear(p, self.weight.flatten(1)), pixel_values.to(self.weight.dtype))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw: torch.Tensor, device) -> torch.Tensor:
        """2-D RoPE angles, (N, Dh/2): first half from the row id, second half from the column id (theta 10000)."""
        quarter = self.cfg.head_dim // 2  # 40 for Dh = 80
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, quarter, 2, device=device, dtype=torch.float) / quarter)
        pos = rotary_position_ids(grid_thw, self.cfg.spatial_merge_size).to(device)  # (N, 2)
        return (pos[..., None].float() * inv_freq).flatten(1)  # (N, 2, Dh/4) -> (N, Dh/2)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg, merge = self.cfg, self.cfg.spatial_merge_size
        unit = merge * merge
        grid_thw = grid_thw.to(pixel_values.device)
        x = self.patch_embed(pixel_values)  # (N, D)
        n = x.shape[0]
        if n != int((grid_thw.prod(-1)).sum()):
            raise ValueError(f"pixel_values has {n} rows but image_grid_thw describes {int(grid_thw.prod(-1).sum())}")
        win_idx, cu_window = window_index(grid_thw, merge, cfg.window_size // merge // cfg.patch_size)
        cu_full = image_seqlens(grid_thw)
        # step 4: reorder blocks of 4 patches into window order; the rotary angles follow the same permutation
        x = x.reshape(n // unit, unit, -1)[win_idx].reshape(n, -1)  # (N, D)
        angles = self.rotary(grid_thw, x.device)
        angles = angles.reshape(n // unit, unit, -1)[win_idx].reshape(n, -1)  # (N, Dh/2)
        emb = torch.cat((angles, angles), dim=-1)[:, None, :]  # (N, 1, Dh) broadcast over heads, kept fp32
        cos, sin = emb.cos(), emb.sin()
        # segments bucketed by length once on the host, shared by every block of that kind
        full, windows = segments_by_length(cu_full), segments_by_length(cu_window)
        for i, block in enumerate(self.blocks):
            segments = full if i in cfg.fullatt_block_indexes else windows
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, segments, use_reentrant=False)
            else:
                x = block(x, cos, sin, segments)
        x = self.merger(x)  # (N/4, out), window order
        return x[torch.argsort(win_idx)]  # step 8: back to raster order = order of the <|image_pad|> tokens
