"""Tiny random transformers Qwen2.5-VL references (docs/qwen25vl.md Appendix B.1), saved with `save_pretrained` so
the files carry the official on-disk key names. Test-only: transformers is an oracle, never a minigmr dependency.
`hf_config_of` maps any minigmr Config to transformers'; the top-level bench.py builds its checkpoint and adapter
and runs transformers with the helpers here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

# special-token ids of the tiny tokenizer: its 22 Qwen added tokens follow 400 BPE tokens, so each is the official
# id - 151243 (<|endoftext|> 151643 -> 400; docs/qwen25vl.md Appendix B.6)
IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 412, 413, 409, 410


def tiny_hf_config(tie=False, vision_depth=2, fullatt=(1,), text_layers=2, window_size=112, vocab=512,
                   hidden=64, heads=4, kv_heads=2, mrope=(2, 3, 3), vision_hidden=32, vision_heads=2):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope)},
                         bos_token_id=400, eos_token_id=402, pad_token_id=400, use_sliding_window=False,
                         max_window_layers=text_layers, tie_word_embeddings=tie),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, out_hidden_size=hidden,
                           num_heads=vision_heads, intermediate_size=2 * vision_hidden, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           fullatt_block_indexes=list(fullatt), in_channels=3, hidden_act="silu",
                           tokens_per_second=2),
        image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def hf_config_of(cfg, token_id):
    """transformers' `Qwen2_5_VLConfig` of a minigmr `Config`; `token_id(s)` is a special token's id."""
    from transformers import Qwen2_5_VLConfig
    t, v = cfg.text, cfg.vision
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                         rms_norm_eps=t.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section)},
                         bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                         pad_token_id=token_id("<|endoftext|>"), use_sliding_window=False,
                         max_window_layers=t.num_hidden_layers, tie_word_embeddings=t.tie_word_embeddings),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size,
                           num_heads=v.num_heads, intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                           in_channels=v.in_channels, hidden_act="silu", tokens_per_second=v.tokens_per_second),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=t.tie_word_embeddings)


def randomize_norms_and_biases(model):
    """Random norms and biases too, so that a loader that skips them cannot pass (and no value is trivial)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if not name.endswith("bias") else 0.0))
    return model


def random_hf_model(config, seed=0):
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    return randomize_norms_and_biases(Qwen2_5_VLForConditionalGeneration(config).eval())


def tiny_hf_model(seed=0, **kw):
    return random_hf_model(tiny_hf_config(**kw), seed)


def save_random_hf(path, config, seed=0, dtype=None):
    model = random_hf_model(config, seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(path)
    return model


def save_tiny_hf(path, seed=0, dtype=None, **kw):
    return save_random_hf(path, tiny_hf_config(**kw), seed, dtype)


def save_random_peft_adapter(model_dir, out_dir, rank, alpha, seed=0):
    """A peft LoRA adapter on every text-decoder projection of the transformers model in `model_dir`: random A (peft's
    init) and a small random B, so that it changes the scores from the first step."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    torch.manual_seed(seed)
    model = get_peft_model(Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    model.save_pretrained(out_dir)


def hf_gmr_logits(model, hf_processor, chats, yes_no):
    """transformers' [z_yes, z_no] (B, 2) fp32 at the last position of each chat, as a careful user computes them:
    its processor and the official chat template, left padding, logits_to_keep=1, no cache."""
    texts = [hf_processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    images = [it["image"] for c in chats for m in c if isinstance(m["content"], list)
              for it in m["content"] if it["type"] == "image"]
    enc = hf_processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
    enc = {k: v.to(model.device) for k, v in enc.items()}  # incl. mm_token_type_ids, needed for M-RoPE
    return model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, yes_no].float()


def hf_logits(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """Logits of the transformers model with `mm_token_type_ids`, without which 5.x silently uses 1-D positions."""
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                    image_grid_thw=image_grid_thw, mm_token_type_ids=(input_ids == IMAGE_PAD).long(), use_cache=False)
    return out.logits


def image_tokens(grid):
    """<|vision_start|> + (t*h*w/4) x <|image_pad|> + <|vision_end|> for one image grid (t, h, w)."""
    t, h, w = grid
    return [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]


def random_pixels(grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 1176, generator=g), torch.tensor(grids, dtype=torch.long)
