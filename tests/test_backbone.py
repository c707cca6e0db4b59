"""Parity of the hand-written Qwen2.5-VL against transformers (CPU, fp32, tiny random configs saved with
save_pretrained), plus checkpoint loading/saving and the official 3B/7B shapes."""
import json
import os

import pytest
import torch
from hf_reference import (IMAGE_PAD, hf_logits, image_tokens, random_pixels, save_tiny_hf, tiny_hf_model)
from safetensors.torch import load_file, save_file

from minigmr.config import Config
from minigmr.decoder import rope_position_ids
from minigmr.model import Qwen25VL
from minigmr.weights import WEIGHT_MAP, to_hf, to_ours

TOL = dict(atol=1e-4, rtol=0)

# Varied configs: untied/tied head, one or several full-attention blocks, 112-px windows (4x4 merged tokens) and
# 56-px windows (2x2), several text layers.
CONFIGS = {
    "untied_1full": dict(tie=False, vision_depth=2, fullatt=(1,)),
    "tied_2full": dict(tie=True, vision_depth=4, fullatt=(1, 3), text_layers=3),
    "window56_2full": dict(tie=False, vision_depth=3, fullatt=(0, 2), window_size=56, hidden=96, heads=6,
                           kv_heads=3, mrope=(2, 2, 4)),
}
# Image grids in patch units: 8x8 and 16x8 are multiples of the 112-px window (8 patches), 6x4 / 10x14 / 4x12 are not.
GRIDS = [(1, 6, 4), (1, 8, 8), (1, 10, 14), (1, 4, 12), (1, 16, 8)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = save_tiny_hf(path, seed=len(request.param), **CONFIGS[request.param])
    return hf, Qwen25VL.from_pretrained(str(path)), str(path)


def build_batch(samples, padding_side):
    """samples: list of (token ids). Returns padded input_ids and attention_mask."""
    S = max(len(s) for s in samples)
    ids = torch.full((len(samples), S), 400, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        sl = slice(S - len(s), S) if padding_side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def mixed_samples():
    """A text-only sample, one with two images, one with one image, odd lengths."""
    g = GRIDS
    a = [401, 20, 21, 22, 23, 24, 25, 26, 27]
    b = [401, 30] + image_tokens(g[0]) + [31, 32, 33] + image_tokens(g[2]) + [34]
    c = [401, 40, 41] + image_tokens(g[1]) + [42, 43, 44, 45, 46, 47, 48]
    return [a, b, c], [g[0], g[2], g[1]]


def test_vision_tower_and_merger(pair):
    hf, ours, _ = pair
    pv, thw = random_pixels(GRIDS, seed=1)
    captured = {}
    handle = ours.vision.merger.register_forward_hook(lambda m, i, o: captured.update(pre=i[0]))  # returns None
    with torch.no_grad():
        out = ours.image_features(pv, thw)
        ref = hf.model.visual(pv, grid_thw=thw)
    handle.remove()
    # blocks output (window order, before the merger) and merged, un-permuted projector output
    torch.testing.assert_close(captured["pre"], ref.last_hidden_state, **TOL)
    torch.testing.assert_close(out, ref.pooler_output, **TOL)
    # the merger alone on the same input
    x = torch.randn(64, ours.config.vision.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.vision.merger(x), hf.model.visual.merger(x), **TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_position_ids_match_get_rope_index(pair, side):
    hf, ours, _ = pair
    samples, grids = mixed_samples()
    ids, mask = build_batch(samples, side)
    thw = torch.tensor(grids)
    ref, _ = hf.model.get_rope_index(ids, mm_token_type_ids=(ids == IMAGE_PAD).long(), image_grid_thw=thw,
                                     attention_mask=mask)
    pos = rope_position_ids(ids, mask, thw, ours.config.text)
    valid = mask.bool().expand(3, -1, -1)
    assert torch.equal(pos[valid], ref[valid])


@pytest.mark.parametrize("side", ["left", "right"])
def test_end_to_end_logits_mixed_batch(pair, side):
    hf, ours, _ = pair
    samples, grids = mixed_samples()
    ids, mask = build_batch(samples, side)
    pv, thw = random_pixels(grids, seed=2)
    ref = hf_logits(hf, ids, mask, pv, thw)
    with torch.no_grad():
        out = ours(ids, mask, pv, thw)
    valid = mask.bool()
    assert ref.shape == out.shape
    torch.testing.assert_close(out[valid], ref[valid], **TOL)


def test_text_only_batch_left_padded(pair):
    hf, ours, _ = pair
    ids, mask = build_batch([[401, 5, 6, 7, 8, 9, 10], [401, 11, 12]], "left")
    ref = hf_logits(hf, ids, mask)
    with torch.no_grad():
        out = ours(ids, mask)
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], **TOL)


def test_prefix_cache_equals_full_forward(pair):
    """Keys/values of a shared prefix reused for a batch of continuations == one full forward per sequence."""
    _, ours, _ = pair
    cfg = ours.config.text
    prefix = [401, 5, 6] + image_tokens(GRIDS[0]) + [7]
    conts = [[8, 9, 10, 11], [12, 13], [14] + image_tokens(GRIDS[1]) + [15]]
    pv, thw = random_pixels([GRIDS[0], GRIDS[1]], seed=3)
    n0 = GRIDS[0][1] * GRIDS[0][2]
    with torch.no_grad():
        feats = ours.image_features(pv, thw)
        p_ids = torch.tensor([prefix])
        p_pos = rope_position_ids(p_ids, None, thw[:1], cfg)
        _, p_kv = ours.text(ours.embed(p_ids, feats[: n0 // 4]), p_pos, torch.ones_like(p_ids))
        ids, mask = build_batch(conts, "right")
        pos = rope_position_ids(ids, mask, thw[1:], cfg, start=int(p_pos.max()) + 1)
        h, _ = ours.text(ours.embed(ids, feats[n0 // 4:]), pos, mask, past=p_kv,
                         past_mask=torch.ones(1, len(prefix), dtype=torch.long))
        for i, c in enumerate(conts):
            full = torch.tensor([prefix + c])
            img = i == 2
            ref, _ = ours.hidden_states(full, pixel_values=pv if img else pv[:n0], image_grid_thw=thw if img else thw[:1])
            torch.testing.assert_close(h[i, : len(c)], ref[0, len(prefix):], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- loading
def _logits(model, hf=None):
    samples, grids = mixed_samples()
    ids, mask = build_batch(samples, "left")
    pv, thw = random_pixels(grids, seed=4)
    if hf is not None:
        return hf_logits(hf, ids, mask, pv, thw)[mask.bool()]
    with torch.no_grad():
        return model(ids, mask, pv, thw)[mask.bool()]


def _flatten_config(path):
    """Rewrite a transformers-5.x nested config.json in the flat official (4.x Hub) format."""
    d = json.load(open(os.path.join(path, "config.json")))
    tc, vc = d.pop("text_config"), d.pop("vision_config")
    rope = tc.pop("rope_parameters")
    flat = {**d, **{k: v for k, v in tc.items() if k not in ("model_type", "layer_types", "dtype")}}
    flat.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                torch_dtype="float32", model_type="qwen2_5_vl")
    vc.pop("rope_parameters", None)
    vc["in_chans"] = vc.pop("in_channels")
    vc["model_type"] = "qwen2_5_vl"
    flat["vision_config"] = vc
    json.dump(flat, open(os.path.join(path, "config.json"), "w"))


def test_single_sharded_flat_nested_bf16_all_load(tmp_path):
    hf = tiny_hf_model(seed=7, tie=False)
    ref = _logits(None, hf)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    hf.save_pretrained(tmp_path / "flat")
    _flatten_config(tmp_path / "flat")
    for name in ("single", "sharded", "flat"):
        torch.testing.assert_close(_logits(Qwen25VL.from_pretrained(str(tmp_path / name))), ref, **TOL)
    # bf16 on disk -> fp32 compute: equal to transformers reading the same bf16 file in fp32
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert "bfloat16" in open(tmp_path / "bf16" / "config.json").read()
    hf16 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ours16 = Qwen25VL.from_pretrained(str(tmp_path / "bf16"))
    assert ours16.text.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(_logits(ours16), _logits(None, hf16), **TOL)
    # and bf16 compute is possible (loose check: same argmax structure is not required, finite is)
    ours_bf = Qwen25VL.from_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert ours_bf.text.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.isfinite(_logits(ours_bf)).all()


def test_save_pretrained_loads_in_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration
    for tie in (False, True):
        hf = tiny_hf_model(seed=11, tie=tie)
        hf.save_pretrained(tmp_path / f"src{tie}")
        ours = Qwen25VL.from_pretrained(str(tmp_path / f"src{tie}"))
        ours.save_pretrained(str(tmp_path / f"ours{tie}"), max_shard_bytes=200_000)
        keys = set(json.load(open(tmp_path / f"ours{tie}" / "model.safetensors.index.json"))["weight_map"])
        assert keys == set(load_file(tmp_path / f"src{tie}" / "model.safetensors"))  # official names, same set
        back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / f"ours{tie}", dtype=torch.float32)
        torch.testing.assert_close(_logits(None, back.eval()), _logits(None, hf), **TOL)
        torch.testing.assert_close(_logits(Qwen25VL.from_pretrained(str(tmp_path / f"ours{tie}"))),
                                   _logits(None, hf), **TOL)
    # saving in another dtype writes it to config.json and leaves the model's config alone
    ours.save_pretrained(str(tmp_path / "bf16"), dtype=torch.bfloat16)
    assert json.load(open(tmp_path / "bf16" / "config.json"))["torch_dtype"] == "bfloat16"
    assert ours.config.dtype == "float32"


def test_new_layout_keys_load(tmp_path):
    """Checkpoints saved with the transformers >= 4.52 names (model.visual.*, model.language_model.*)."""
    hf = tiny_hf_model(seed=3)
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    new = {("model." + k if k.startswith("visual.") else
            k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k): v for k, v in sd.items()}
    save_file(new, tmp_path / "model.safetensors", metadata={"format": "pt"})
    torch.testing.assert_close(_logits(Qwen25VL.from_pretrained(str(tmp_path))), _logits(None, hf), **TOL)


@pytest.fixture
def saved(tmp_path):
    tiny_hf_model(seed=5).save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def test_missing_key_is_named(saved):
    path, sd = saved
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: \['model.layers.1.mlp.up_proj.weight'\]"):
        Qwen25VL.from_pretrained(str(path))


def test_extra_key_is_named(saved):
    path, sd = saved
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys.*model.layers.0.self_attn.rotary_emb.inv_freq"):
        Qwen25VL.from_pretrained(str(path))


def test_wrong_shape_is_named(saved):
    path, sd = saved
    sd["visual.merger.mlp.2.weight"] = torch.zeros(3, 3)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"visual.merger.mlp.2.weight: checkpoint \(3, 3\) vs model \(64, 128\)"):
        Qwen25VL.from_pretrained(str(path))


def test_truncated_and_garbage_files(saved):
    path, _ = saved
    data = open(path / "model.safetensors", "rb").read()
    open(path / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file.*truncated"):
        Qwen25VL.from_pretrained(str(path))
    open(path / "model.safetensors", "wb").write(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Qwen25VL.from_pretrained(str(path))


def test_missing_shard_and_no_weights(saved, tmp_path_factory):
    path, _ = saved
    json.dump({"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}},
              open(path / "model.safetensors.index.json", "w"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        Qwen25VL.from_pretrained(str(path))
    empty = tmp_path_factory.mktemp("empty")
    json.dump(json.load(open(path / "config.json")), open(empty / "config.json", "w"))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        Qwen25VL.from_pretrained(str(empty))


# ----------------------------------------------------------------------------- official shapes
@pytest.mark.parametrize("name,params,tensors", [("3b", 3.755e9, 824), ("7b", 8.292e9, 729)])
def test_official_shapes_on_meta(name, params, tensors):
    cfg = Config.preset(name)
    with torch.device("meta"):
        model = Qwen25VL(cfg)
    names = [to_hf(n) for n in model.state_dict()]
    assert len(names) == tensors
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 5e-4, n
    sd = model.state_dict()
    assert tuple(sd["vision.patch_embed.weight"].shape) == (1280, 3, 2, 14, 14)
    assert tuple(sd["vision.merger.fc1.weight"].shape) == (5120, 5120)
    assert tuple(sd["text.layers.0.attn.k_proj.weight"].shape) == ((256, 2048) if name == "3b" else (512, 3584))
    assert ("lm_head.weight" in names) == (name == "7b")
    assert sum(k.startswith("visual.") for k in names) == 390
    # every name is one the weight map knows, and round-trips
    assert all(to_ours(k) == o for k, o in zip(names, model.state_dict()))
    assert len(WEIGHT_MAP) == 33


def test_config_formats_agree(tmp_path):
    hf = tiny_hf_model(seed=1, tie=True)
    hf.save_pretrained(tmp_path / "nested")
    hf.save_pretrained(tmp_path / "flat")
    _flatten_config(tmp_path / "flat")
    a, b = Config.from_json(str(tmp_path / "nested")), Config.from_json(str(tmp_path / "flat"))
    assert a.text == b.text and a.vision == b.vision
    assert a.text.mrope_section == [2, 3, 3] and a.text.tie_word_embeddings and a.vision.fullatt_block_indexes == [1]
    assert a.text.image_token_id == IMAGE_PAD
    # our own flat output reads back identically
    a.save(str(tmp_path))
    assert Config.from_json(str(tmp_path / "config.json")).text == a.text
    with pytest.raises(ValueError, match="mrope_section"):
        a.replace(text=dict(mrope_section=[1, 1, 1]))
