"""Qwen2.5-VL = vision tower + patch merger + Qwen2 decoder + LM head, wired as transformers'
`Qwen2_5_VLForConditionalGeneration` (qwen25vl.md §3, §4.4).

    pixel_values (N, 1176) --vision--> image features (N/4, D) --written at the <|image_pad|> positions-->
    token embeddings (B, S, D) --decoder with M-RoPE--> hidden (B, S, D) --LM head--> logits (B, S, V)

A reranker needs only the last position and only the "yes"/"no" rows of the head; `hidden_states` and
`head_rows` give exactly that without the (B, S, V) logits, and `forward` gives the full logits for parity.
"""
import torch
import torch.nn as nn

from .config import Config
from .decoder import TextModel, rope_position_ids
from .vision import VisionTower


class Qwen25VL(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision)
        self.text = TextModel(config.text)
        t = config.text
        self.lm_head = None if t.tie_word_embeddings else nn.Linear(t.hidden_size, t.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # transformers' Qwen2_5_VLPreTrainedModel init: N(0, 0.02) weights, zero biases (norms stay at 1)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu") -> "Qwen25VL":
        from .weights import load_checkpoint
        return load_checkpoint(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str, dtype=None, max_shard_bytes=None) -> None:
        from .weights import save_checkpoint
        save_checkpoint(self, path, dtype=dtype, max_shard_bytes=max_shard_bytes)

    # ------------------------------------------------------------------ pieces
    @property
    def head_weight(self) -> torch.Tensor:
        """(V, D): the LM head, tied to the input embedding when `tie_word_embeddings` (3B)."""
        return self.text.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def head_rows(self, token_ids) -> torch.Tensor:
        """(k, D) rows of the LM head, e.g. for "yes" and "no": logits of those tokens = h @ rows.T."""
        return self.head_weight[torch.as_tensor(token_ids, device=self.head_weight.device)]

    def image_features(self, pixel_values, image_grid_thw) -> torch.Tensor:
        """(N/4, D) merged vision features of all images, in image order then raster order."""
        return self.vision(pixel_values, image_grid_thw)

    def embed(self, input_ids, image_features=None, image_positions=None) -> torch.Tensor:
        """Token embeddings with the image features written at the <|image_pad|> positions (masked_scatter).

        `image_positions` (flat indices into B*S, host-checked by the caller) skips the count check, which would
        otherwise read a device value back to the host: the scorer's loop stays free of synchronisation."""
        x = self.text.embed_tokens(input_ids)  # (B, S, D)
        if image_positions is not None:
            flat = x.flatten(0, 1).index_copy(0, image_positions, image_features.to(x.dtype))  # (B*S, D)
            return flat.view_as(x)
        is_img = input_ids == self.config.text.image_token_id
        n_tokens, n_feats = int(is_img.sum()), 0 if image_features is None else image_features.shape[0]
        if n_tokens != n_feats:
            raise ValueError(f"{n_tokens} <|image_pad|> tokens in input_ids but {n_feats} image features; "
                             "the processor must expand each image to (h*w/4) pad tokens")
        if n_tokens:
            x = x.masked_scatter(is_img[..., None], image_features.to(x.dtype))
        return x

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                      image_features=None, past=None, past_mask=None, start_pos=0, position_ids=None,
                      image_positions=None, last_only=False):
        """Final-norm hidden states (B, S, D) and the per-layer keys/values of these tokens.

        `image_features` may be passed precomputed (scorer: one vision pass per distinct image); `past`/`past_mask`
        are the keys/values and mask of a shared prefix, whose next position is `start_pos`; `position_ids`
        (3, B, S) may be precomputed on the host. `last_only` returns only the last column (B, 1, D) and skips the
        last layer's work for the other positions (their keys/values are still computed): left padding only."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.image_features(pixel_values, image_grid_thw)
        x = self.embed(input_ids, image_features, image_positions)
        if position_ids is None:
            position_ids = rope_position_ids(input_ids, attention_mask, image_grid_thw, self.config.text,
                                             self.config.vision.spatial_merge_size, start=start_pos)  # (3, B, S)
        return self.text(x, position_ids, attention_mask, past=past, past_mask=past_mask, last_only=last_only)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """Full logits (B, S, V), same meaning as transformers' `Qwen2_5_VLForConditionalGeneration(...).logits`."""
        h, _ = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw)
        return h @ self.head_weight.T
