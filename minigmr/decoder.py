"""The Qwen2 text decoder of Qwen2.5-VL, with multimodal RoPE (M-RoPE) and its position ids.

Mirrors transformers `Qwen2_5_VLTextModel`, `Qwen2_5_VLDecoderLayer`, `Qwen2_5_VLAttention`,
`Qwen2_5_VLRotaryEmbedding` and `Qwen2_5_VLModel.get_rope_index` (modeling_qwen2_5_vl.py, 5.x); docs/qwen25vl.md §4.

Two things differ from a plain Qwen2:
  * positions are 3 streams (temporal, height, width), (3, B, S). Text tokens have three equal positions; the
    tokens of an image get (t0, t0 + row, t0 + col) over its merged grid, and the text after it resumes at
    t0 + max(rows, cols). `rope_position_ids` computes this from input_ids alone (no cached `rope_deltas`).
  * the rotary angles of head dims are taken from different streams: `mrope_section` = [16, 24, 24] means freq
    dims 0-15 use t, 16-39 use h, 40-63 use w (and the same again for the second half).

`TextModel.forward` accepts the keys/values of an already-encoded prefix (`past`), so a scorer can encode one
query prefix once and reuse it for many documents.
"""
from itertools import groupby

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import TextConfig
from .layers import GatedMLP, RMSNorm, apply_rotary, rowwise


# ----------------------------------------------------------------------------- positions
def rope_position_ids(input_ids, attention_mask, image_grid_thw, cfg: TextConfig, merge: int = 2, start=0):
    """3-D positions (3, B, S) of text and image tokens, as transformers `Qwen2_5_VLModel.get_rope_index` (5.x).

    Row by row, over the valid tokens (attention_mask 1: left or right padding; pads get 0): a run of text tokens
    counts up on all three streams; a run of `<|image_pad|>` tokens is one image, taking the next row of
    `image_grid_thw` (batch-major, in sequence order), whose merged grid (t, h, w) gets (p + frame, p + row, p + col);
    the text after it resumes at p + max(h, w). `start` (int or one per row) is the first position, e.g. the next
    one after a cached prefix.
    """
    B, S = input_ids.shape
    ids = input_ids.cpu()
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    pos, used = torch.zeros(3, B, S, dtype=torch.long), 0  # used: image_grid_thw rows consumed so far
    for b, p in enumerate(torch.as_tensor(start).expand(B).tolist()):
        cols = valid[b].nonzero().flatten()  # the valid columns of this row
        pieces = []
        for is_image, run in groupby((ids[b, cols] == cfg.image_token_id).tolist()):
            n = len(list(run))
            if not is_image:  # text: one position further on all three streams per token
                pieces.append(torch.arange(p, p + n).expand(3, n))
                p += n
                continue
            if used == len(grids):
                raise ValueError(f"input_ids hold more image-token runs than image_grid_thw's {len(grids)} rows")
            t, h, w = grids[used][0], grids[used][1] // merge, grids[used][2] // merge
            used += 1
            if t * h * w != n:
                raise ValueError(f"row {b}: an image-token run of {n} tokens for a grid of {t}x{h}x{w} merged tokens")
            frame, y, x = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            pieces.append(torch.stack([frame, y, x]).reshape(3, n) + p)  # (3, t*h*w), raster order
            p += max(h, w)
        if pieces:
            pos[:, b, cols] = torch.cat(pieces, dim=1)
    if used != len(grids):
        raise ValueError(f"input_ids hold {used} image-token runs but image_grid_thw has {len(grids)} rows")
    return pos.to(input_ids.device)


def mrope_cos_sin(position_ids, cfg: TextConfig, dtype):
    """cos/sin (B, 1, S, Dh) for M-RoPE. Angles in fp32, then cast to the activation dtype (as transformers)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=position_ids.device, dtype=torch.float) / dim)
    freqs = position_ids[..., None].float() * inv_freq  # (3, B, S, Dh/2)
    # dims [0, s0) from stream t, [s0, s0+s1) from h, the rest from w
    chunks = freqs.split(cfg.mrope_section, dim=-1)
    freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)  # (B, S, Dh/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, Dh)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Grouped-query causal self-attention; q/k/v with bias, o without (Qwen2)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def heads(self, t, cos=None, sin=None):
        """(B, S, n*Dh) -> (B, n, S, Dh), rotated if cos/sin are given."""
        t = t.view(*t.shape[:2], -1, self.head_dim).transpose(1, 2)
        return t if cos is None else apply_rotary(t, cos, sin)

    def key_values(self, x, cos, sin):
        """Rotated keys and values (B, KV, S, Dh) of x (B, S, D): what a prefix cache holds."""
        k, v = rowwise(lambda h: (self.k_proj(h), self.v_proj(h)), x)  # (B, S, KV*Dh) each
        return self.heads(k, cos, sin), self.heads(v)

    def forward(self, x, cos, sin, mask, past=None):
        B, S, _ = x.shape
        q, k, v = rowwise(lambda h: (self.q_proj(h), self.k_proj(h), self.v_proj(h)), x)  # (B, S, H*Dh), 2 x KV*Dh
        q = self.heads(q, cos, sin)  # (B, H, S, Dh)
        new_kv = k, v = self.heads(k, cos, sin), self.heads(v)  # (B, KV, S, Dh)
        if past is not None:  # prefix keys/values, (1 or B, KV, P, Dh): broadcast over the batch without a copy
            k = torch.cat((past[0].expand(B, -1, -1, -1), k), dim=2)  # (B, KV, P+S, Dh)
            v = torch.cat((past[1].expand(B, -1, -1, -1), v), dim=2)
        # each KV head serves n_heads/n_kv consecutive query heads (transformers `repeat_kv`)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return rowwise(self.o_proj, out.transpose(1, 2).reshape(B, S, -1)), new_kv  # (B, S, H*Dh) -> (B, S, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # checkpoint: input_layernorm
        self.attn = Attention(cfg)  # self_attn
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # post_attention_layernorm
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, past=None):
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv


def attention_mask_4d(attention_mask, S, past_mask=None):
    """Boolean SDPA mask (B, 1, S, P+S): causal among the S new tokens, every valid prefix key visible, pads hidden.

    attention_mask: (B, S) for the new tokens; past_mask: (B or 1, P) for the prefix (None = no prefix).
    A pad query would see no key at all (NaN in SDPA, and 0 * NaN poisons the next layer), so every token may
    always see itself; valid tokens never see pads, so their outputs are exact.
    """
    device = attention_mask.device
    B = attention_mask.shape[0]
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()  # (S, S)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, S, S)
    mask = mask | torch.eye(S, dtype=torch.bool, device=device)
    if past_mask is not None:
        prefix = past_mask.bool()[:, None, :].expand(B, S, -1)  # (B, S, P)
        mask = torch.cat((prefix, mask), dim=-1)  # (B, S, P+S)
    return mask[:, None]


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, inputs_embeds, position_ids, attention_mask, past=None, past_mask=None):
        """inputs_embeds (B, S, D), position_ids (3, B, S), attention_mask (B, S) of 0/1.
        past: list over layers of (k, v) (1 or B, KV, P, Dh) for a shared prefix, with past_mask (1 or B, P).
        Returns the final-norm hidden states (B, S, D) and this call's keys/values per layer."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg, inputs_embeds.dtype)
        mask = attention_mask_4d(attention_mask, inputs_embeds.shape[1], past_mask)
        x, kvs = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, kv = self.run_layer(layer, x, cos, sin, mask, None if past is None else past[i])
            kvs.append(kv)
        return self.norm(x), kvs

    def run_layer(self, layer: DecoderLayer, *args):
        """layer(*args); under gradient checkpointing its activations are recomputed in the backward instead."""
        if self.gradient_checkpointing and self.training:
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)
