"""The Qwen2 text decoder of Qwen2.5-VL, with multimodal RoPE (M-RoPE) and its position ids.

Mirrors transformers `Qwen2_5_VLTextModel`, `Qwen2_5_VLDecoderLayer`, `Qwen2_5_VLAttention`,
`Qwen2_5_VLRotaryEmbedding` and `Qwen2_5_VLModel.get_rope_index` (modeling_qwen2_5_vl.py, 5.x); qwen25vl.md §4.

Two things differ from a plain Qwen2:
  * positions are 3 streams (temporal, height, width), (3, B, S). Text tokens have three equal positions; the
    tokens of an image get (t0, t0 + row, t0 + col) over its merged grid, and the text after it resumes at
    t0 + max(rows, cols). `rope_position_ids` computes this from input_ids alone (no cached `rope_deltas`).
  * the rotary angles of head dims are taken from different streams: `mrope_section` = [16, 24, 24] means freq
    dims 0-15 use t, 16-39 use h, 40-63 use w (and the same again for the second half).

`TextModel.forward` accepts the keys/values of an already-encoded prefix (`past`), so a scorer can encode one
query prefix once and reuse it for many documents.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import TextConfig
from .layers import GatedMLP, RMSNorm, apply_rotary


# ----------------------------------------------------------------------------- positions
def rope_position_ids(input_ids, attention_mask, image_grid_thw, cfg: TextConfig, merge: int = 2, start=0):
    """3-D positions (3, B, S) for text + image tokens, mirroring `get_rope_index` of transformers 5.x.

    Only tokens with attention_mask == 1 count (left or right padding both work); pads get position 0.
    Each maximal run of `<|image_pad|>` tokens is one image, consuming the next row of `image_grid_thw`
    (batch-major, in sequence order). `start` (int or (B,) tensor) offsets every row, e.g. the next position after
    a cached prefix. Vectorised over tokens: no Python loop over the sequence, only tensor ops.
    """
    B, S = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_img = (input_ids == cfg.image_token_id) & valid  # (B, S)
    starts_run = is_img & ~F.pad(is_img, (1, 0))[:, :-1]  # first token of each image run
    ends_run = is_img & ~F.pad(is_img, (0, 1))[:, 1:]  # last token of each image run
    n_runs = int(starts_run.sum())
    n_grids = 0 if image_grid_thw is None else image_grid_thw.shape[0]
    if n_runs != n_grids:
        raise ValueError(f"input_ids hold {n_runs} image-token runs but image_grid_thw has {n_grids} rows")
    # per-token grid of the image it belongs to (llm units: merged tokens)
    ordinal = (starts_run.flatten().cumsum(0) - 1).clamp(min=0).reshape(B, S)  # image number of each token
    grid = (image_grid_thw.to(device) if n_grids else torch.ones(1, 3, dtype=torch.long, device=device)).long()
    gh = (grid[:, 1] // merge).clamp(min=1)[ordinal]  # (B, S); clamp only guards text-only batches
    gw = (grid[:, 2] // merge).clamp(min=1)[ordinal]
    # how far each token moves the running position: text 1; an image max(H, W) at its last token (t = 0 images)
    advance = torch.where(is_img, torch.where(ends_run, torch.maximum(gh, gw), 0), valid.long())
    base = advance.cumsum(-1) - advance  # exclusive prefix sum: running position before each token
    # inside an image run every token shares the run's base; j = index within the run
    idx = torch.arange(S, device=device).expand(B, S)
    run_start = torch.where(starts_run, idx, 0).cummax(-1).values  # (B, S) index of the current run's first token
    j = idx - run_start
    run_base = base.gather(1, run_start)
    t_off = torch.where(is_img, j // (gh * gw), 0)  # frame (0 for still images)
    h_off = torch.where(is_img, (j // gw) % gh, 0)
    w_off = torch.where(is_img, j % gw, 0)
    pos0 = torch.where(is_img, run_base, base)
    pos = torch.stack([pos0 + t_off, pos0 + h_off, pos0 + w_off])  # (3, B, S)
    start = torch.as_tensor(start, device=device).reshape(-1, 1)  # (B or 1, 1)
    return torch.where(valid, pos + start, 0)


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
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, past=None, last_only=False):
        B, S, _ = x.shape
        k = self.k_proj(x).view(B, S, self.n_kv, -1).transpose(1, 2)  # (B, KV, S, Dh)
        v = self.v_proj(x).view(B, S, self.n_kv, -1).transpose(1, 2)
        k = apply_rotary(k, cos, sin)
        if last_only:  # only the last query is needed: one row of q, of the mask, of the output
            x, cos, sin, mask, S = x[:, -1:], cos[..., -1:, :], sin[..., -1:, :], mask[..., -1:, :], 1
        q = apply_rotary(self.q_proj(x).view(B, S, self.n_heads, -1).transpose(1, 2), cos, sin)  # (B, H, S, Dh)
        new_kv = (k, v)
        if past is not None:  # prefix keys/values, (1 or B, KV, P, Dh): broadcast over the batch without a copy
            k = torch.cat((past[0].expand(B, -1, -1, -1), k), dim=2)  # (B, KV, P+S, Dh)
            v = torch.cat((past[1].expand(B, -1, -1, -1), v), dim=2)
        # each KV head serves n_heads/n_kv consecutive query heads (transformers `repeat_kv`)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1)), new_kv  # (B, S, H*Dh) -> (B, S, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # checkpoint: input_layernorm
        self.attn = Attention(cfg)  # self_attn
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # post_attention_layernorm
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, past=None, last_only=False):
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past, last_only)
        x = (x[:, -1:] if last_only else x) + a
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

    def forward(self, inputs_embeds, position_ids, attention_mask, past=None, past_mask=None, last_only=False):
        """inputs_embeds (B, S, D), position_ids (3, B, S), attention_mask (B, S) of 0/1.
        past: list over layers of (k, v) (1 or B, KV, P, Dh) for a shared prefix, with past_mask (1 or B, P).
        last_only: the last layer computes queries, MLP and norm for the last column only (B, 1, D) — all a
        reranker needs (its keys/values for the other positions are still produced).
        Returns the final-norm hidden states (B, S, D) and this call's keys/values per layer."""
        S = inputs_embeds.shape[1]
        cos, sin = mrope_cos_sin(position_ids, self.cfg, inputs_embeds.dtype)
        mask = attention_mask_4d(attention_mask, S, past_mask)
        x, kvs = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            p = None if past is None else past[i]
            last = last_only and i == len(self.layers) - 1
            if self.gradient_checkpointing and self.training:
                x, kv = checkpoint(layer, x, cos, sin, mask, p, last, use_reentrant=False)
            else:
                x, kv = layer(x, cos, sin, mask, p, last)
            kvs.append(kv)
        return self.norm(x), kvs
