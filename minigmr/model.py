"""Qwen2.5-VL = vision tower + patch merger + Qwen2 decoder + LM head, wired as transformers'
`Qwen2_5_VLForConditionalGeneration` (docs/qwen25vl.md §3, §4.4).

    pixel_values (N, 1176) --vision--> image features (N/4, D) --written at the <|image_pad|> positions-->
    token embeddings (B, S, D) --decoder with M-RoPE--> hidden (B, S, D) --LM head--> logits (B, S, V)

`forward` gives the full logits (for parity), `hidden_states` the decoder's output without the (B, S, V) logits.
The lean entry is the decoder itself, `model.text(inputs_embeds, position_ids, attention_mask, past, past_mask)`,
fed with embeddings, positions and a prefix cache its caller prepared (as transformers' `Qwen2_5_VLTextModel`
takes `inputs_embeds`, `position_ids` and `past_key_values`): the fused scorer in scoring.py is that caller.
"""
import torch
import torch.nn as nn

from .config import Config
from .decoder import TextModel, rope_position_ids
from .vision import VisionTower
from .weights import load_into, save_checkpoint


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
        """A checkpoint directory (config.json + safetensors): built on the meta device, then filled tensor by
        tensor in `dtype` on `device` (weights.load_into), so the weights are never held twice."""
        with torch.device("meta"):
            model = cls(Config.from_json(path))
        load_into(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path: str, dtype=None, max_shard_bytes=None) -> None:
        """config.json + safetensors in the official layout (loads in transformers); `dtype` casts on the way."""
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

    def embed(self, input_ids, image_features=None) -> torch.Tensor:
        """Token embeddings (B, S, D) with the image features written at the <|image_pad|> positions, in order
        (transformers `Qwen2_5_VLModel.forward`: masked_scatter)."""
        x = self.text.embed_tokens(input_ids)  # (B, S, D)
        is_img = input_ids == self.config.text.image_token_id
        n_tokens, n_feats = int(is_img.sum()), 0 if image_features is None else image_features.shape[0]
        if n_tokens != n_feats:
            raise ValueError(f"{n_tokens} <|image_pad|> tokens in input_ids but {n_feats} image features; "
                             "the processor must expand each image to (h*w/4) pad tokens")
        return x.masked_scatter(is_img[..., None], image_features.to(x.dtype)) if n_tokens else x

    def hidden_states(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
        """Final-norm hidden states (B, S, D) of whole prompts, and the keys/values of every layer."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feats = None if pixel_values is None else self.image_features(pixel_values, image_grid_thw)
        positions = rope_position_ids(input_ids, attention_mask, image_grid_thw, self.config.text,
                                      self.config.vision.spatial_merge_size)  # (3, B, S)
        return self.text(self.embed(input_ids, feats), positions, attention_mask)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """Full logits (B, S, V), same meaning as transformers' `Qwen2_5_VLForConditionalGeneration(...).logits`."""
        h, _ = self.hidden_states(input_ids, attention_mask, pixel_values, image_grid_thw)
        return h @ self.head_weight.T
