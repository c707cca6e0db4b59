"""Turning (conversation, images) into model inputs for Qwen2.5-VL: image processor + chat template + tokenizer.

An image becomes a sequence of 14x14 patches. It is first resized so both sides are multiples of 28
(patch 14 x merge 2) and its pixel count lies in [min_pixels, max_pixels] (`smart_resize`), then rescaled and
CLIP-normalised, repeated to 2 frames (the vision tower's Conv3d has temporal kernel 2) and cut into rows of
3*2*14*14 = 1176 numbers. Rows are ordered so that the 4 patches of every 2x2 block are consecutive: the patch
merger later concatenates each run of 4 rows into one LLM token. So an image with a grid of gh x gw patches
gives gh*gw rows of pixel_values and gh*gw/4 `<|image_pad|>` tokens in the text.

The text side is the Qwen2.5-VL chat format:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n
    <|im_start|>assistant\n

and each `<|image_pad|>` is expanded to that image's token count before tokenizing.

Everything here mirrors transformers 5.23 (`Qwen2VLImageProcessorPil`, the slow/PIL image processor, and
`Qwen2_5_VLProcessor` with the official chat template) bit for bit; tests/test_processor.py checks that.
"""

import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from .files import read_json_object

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


# ----------------------------------------------------------------------------------------------------------------
# Image processor

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 12845056):
    """Target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels], aspect ratio kept
    as well as possible. Mirrors transformers `qwen2_vl.image_processing_pil_qwen2_vl.smart_resize` (5.23)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image has an empty side: height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be at most 200, got {max(height, width) / min(height, width):.1f} "
                         f"(height={height}, width={width})")
    # Python's round() rounds halves to even: 42 -> 56 and 70 -> 56 (not 84). Kept on purpose for parity.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(grid, merge_size: int = 2) -> int:
    """Number of `<|image_pad|>` tokens for one image grid (t, h, w) in patch units: t*h*w / merge_size**2."""
    t, h, w = (int(v) for v in grid)
    if (t * h * w) % (merge_size ** 2):
        raise ValueError(f"grid {(t, h, w)} is not divisible into {merge_size}x{merge_size} merge blocks")
    return t * h * w // merge_size ** 2


def load_rgb(image) -> Image.Image:
    """PIL image or file path -> RGB PIL image, exactly as transformers' Qwen2-VL image processor gets it.

    - A path goes through `image_utils.load_image` first: EXIF orientation applied, then `convert("RGB")`. That
      drops an alpha band, but Pillow keeps a single transparent colour (tRNS, GIF) in `info["transparency"]`.
    - Then every image goes through `image_transforms.convert_to_rgb`: with an alpha band or a `transparency`
      entry it is composited onto white (for a path: every pixel of the transparent colour turns white), else
      `convert("RGB")`.
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                image = ImageOps.exif_transpose(f).convert("RGB")
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for broken files
            raise ValueError(f"cannot open image file {os.fspath(image)!r}: {e}") from e
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a file path, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


class ImageProcessor:
    """Qwen2-VL image processor (slow/PIL path). `processor(images)` -> (pixel_values, image_grid_thw)."""

    def __init__(self, min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
        sizes = {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": patch_size,
                 "temporal_patch_size": temporal_patch_size, "merge_size": merge_size}
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
        numbers = lambda v: all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if len(image_mean) != 3 or len(image_std) != 3 or not numbers(image_mean) or not numbers(image_std):
            raise ValueError(f"image_mean and image_std need 3 numbers, got {image_mean} and {image_std}")
        if not all(x > 0 for x in image_std):  # a zero std divides by zero: NaN scores
            raise ValueError(f"image_std must be > 0, got {image_std}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        # rescale + normalize of every uint8 level, per channel, with transformers' op order and precision:
        # uint8 -> float64 * (1/255) -> float32, then (x - mean) / std in float32. (3, 256) float32
        levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean, std = np.array(image_mean, np.float32)[:, None], np.array(image_std, np.float32)[:, None]  # (3, 1)
        self.level_values = (levels - mean) / std

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None):
        """Read `preprocessor_config.json` from a checkpoint folder (or that file itself). Accepts the official
        flat `min_pixels`/`max_pixels` and the newer `size: {shortest_edge, longest_edge}`; as in transformers,
        the flat keys win when both are present. Explicit `min_pixels`/`max_pixels` arguments override the file."""
        file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no preprocessor_config.json at {path!r}")
        cfg = read_json_object(file)
        if not isinstance(cfg.get("size") or {}, dict):
            raise ValueError(f"{file}: expected a JSON object for 'size', got {cfg['size']!r:.80}")
        size = cfg.get("size") or {}
        lo = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
        hi = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
        if lo is None or hi is None:
            raise ValueError(f"{file}: need min_pixels/max_pixels or size.shortest_edge/size.longest_edge, got {cfg}")
        # Settings this processor does not implement must not be silently ignored.
        for key, want in [("do_resize", True), ("do_rescale", True), ("do_normalize", True),
                          ("do_convert_rgb", True), ("resample", 3)]:
            if key in cfg and cfg[key] != want:
                raise ValueError(f"{file}: {key}={cfg[key]!r} is not supported (only {want!r})")
        if abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
            raise ValueError(f"{file}: rescale_factor={cfg['rescale_factor']} is not supported (only 1/255)")
        try:
            return cls(min_pixels=lo if min_pixels is None else min_pixels,
                       max_pixels=hi if max_pixels is None else max_pixels,
                       patch_size=cfg.get("patch_size", 14), temporal_patch_size=cfg.get("temporal_patch_size", 2),
                       merge_size=cfg.get("merge_size", 2), image_mean=cfg.get("image_mean", OPENAI_CLIP_MEAN),
                       image_std=cfg.get("image_std", OPENAI_CLIP_STD))
        except (TypeError, ValueError) as e:  # a field of the wrong type or range, located
            raise ValueError(f"{file}: {e}") from None

    def preprocess(self, image):
        """One image -> (patches float32 (gh*gw, 3*T*p*p), [1, gh, gw]). Mirrors Qwen2VLImageProcessorPil."""
        p, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        img = load_rgb(image)
        height, width = smart_resize(img.height, img.width, p * m, self.min_pixels, self.max_pixels)
        # transformers image_transforms.resize: PIL bicubic, reducing_gap=None (no two-step downscale)
        img = img.resize((width, height), resample=Image.BICUBIC, reducing_gap=None)
        x = np.asarray(img)  # (H, W, 3) uint8
        # rescale + normalize as a table lookup: the same float32 values as computing them, without the arithmetic
        x = np.stack([self.level_values[c].take(x[..., c]) for c in range(3)])  # (C, H, W) float32
        C, gh, gw = x.shape[0], height // p, width // p
        # A still image is one frame repeated to fill the Conv3d's temporal kernel, so grid_t = 1.
        x = np.broadcast_to(x[None], (T, C, height, width))  # (T, C, H, W)
        x = x.reshape(1, T, C, gh // m, m, p, gw // m, m, p)  # (t, T, C, bh, mh, ph, bw, mw, pw)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, C, T, ph, pw): 2x2 blocks consecutive
        x = x.reshape(gh * gw, C * T * p * p)  # (gh*gw, 1176)
        return np.ascontiguousarray(x), [1, gh, gw]

    def __call__(self, images):
        """List of PIL images / paths -> (pixel_values float32 (sum of gh*gw, 1176), image_grid_thw long (n, 3)),
        images concatenated in order."""
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        if len(images) == 0:
            raise ValueError("ImageProcessor got no images")
        patches, grids = zip(*(self.preprocess(im) for im in images))
        pixel_values = patches[0] if len(patches) == 1 else np.concatenate(patches, axis=0)  # one image: no copy
        return torch.from_numpy(pixel_values), torch.tensor(grids, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------------------
# Chat processor

class Processor:
    """Tokenizer + image processor + Qwen2.5-VL chat template (mirrors transformers' Qwen2_5_VLProcessor)."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.pad_id = self.token_id("<|endoftext|>")  # Qwen's pad token (there is no dedicated pad)
        self.image_pad_id = self.token_id("<|image_pad|>")
        self.vision_start_id = self.token_id("<|vision_start|>")
        self.vision_end_id = self.token_id("<|vision_end|>")
        self.im_start_id = self.token_id("<|im_start|>")
        self.im_end_id = self.token_id("<|im_end|>")

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None):
        """Load `tokenizer.json` and `preprocessor_config.json` from a checkpoint folder."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        try:
            tokenizer = Tokenizer.from_file(tok_file)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{tok_file}: not a tokenizers JSON file ({e})") from None
        return cls(tokenizer, ImageProcessor.from_pretrained(path, min_pixels, max_pixels))

    def token_id(self, token: str) -> int:
        """Id of a string that must tokenize to exactly one token (e.g. "yes", "no", "<|im_end|>")."""
        ids = self.tokenizer.encode(token, add_special_tokens=False).ids
        if len(ids) != 1:
            raise ValueError(f"{token!r} is not a single token in this vocabulary (it encodes to {ids})")
        return ids[0]

    def render(self, conversation, add_generation_prompt: bool = True) -> str:
        """Conversation (HF messages format) -> prompt string, as the official Qwen2.5-VL chat template renders it."""
        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError(f"a conversation must be a non-empty list of messages, got {conversation!r:.200}")
        out = []
        for i, msg in enumerate(conversation):
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {i}: need a dict with role system/user/assistant, got {msg!r:.200}")
            if i == 0 and msg["role"] != "system":
                out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
            content = msg.get("content")
            if isinstance(content, str):
                body = content
            elif isinstance(content, (list, tuple)):
                body = "".join(self._render_item(item, i, j) for j, item in enumerate(content))
            else:
                raise ValueError(f"message {i}: content must be a string or a list of items, got {content!r:.200}")
            out.append(f"<|im_start|>{msg['role']}\n{body}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)

    @staticmethod
    def _render_item(item, i, j) -> str:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            return IMAGE_PLACEHOLDER
        if kind == "text" and isinstance(item.get("text"), str):
            return item["text"]
        raise ValueError(f"message {i}, content item {j}: expected {{'type': 'image', 'image': ...}} or "
                         f"{{'type': 'text', 'text': str}}, got {item!r:.200}")

    def encode(self, text: str, image_grid_thw=None) -> list:
        """Prompt string -> token ids. Each `<|image_pad|>` (in order) is first expanded in the *string* to its
        image's token count, then the whole string is tokenized (as Qwen2_5_VLProcessor does); no BOS/EOS."""
        return self.tokenizer.encode(self.expand(text, image_grid_thw), add_special_tokens=False).ids

    def encode_batch(self, texts, image_grid_thws) -> list:
        """[encode(text, grids) for each pair], in one call that the tokenizer spreads over its threads."""
        expanded = [self.expand(text, grids) for text, grids in zip(texts, image_grid_thws, strict=True)]
        return [e.ids for e in self.tokenizer.encode_batch(expanded, add_special_tokens=False)]

    def expand(self, text: str, image_grid_thw=None) -> str:
        """The prompt with each `<|image_pad|>` repeated its image's token count."""
        parts = text.split("<|image_pad|>")
        grids = [] if image_grid_thw is None else [list(g) for g in image_grid_thw]
        if len(parts) - 1 != len(grids):
            raise ValueError(f"text has {len(parts) - 1} <|image_pad|> placeholders but {len(grids)} image grids "
                             f"were given")
        pieces = [parts[0]]
        for grid, part in zip(grids, parts[1:]):
            pieces += ["<|image_pad|>" * num_image_tokens(grid, self.image_processor.merge_size), part]
        return "".join(pieces)

    def apply_chat(self, conversations, add_generation_prompt: bool = True, padding_side: str = "left") -> dict:
        """Batch of conversations -> padded model inputs (torch tensors):
        input_ids long (B, S), attention_mask long (B, S), pixel_values float32 (N, 1176) or None,
        image_grid_thw long (n, 3) or None. Images are taken in conversation order, then batch order."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not isinstance(conversations, (list, tuple)) or len(conversations) == 0:
            raise ValueError("apply_chat needs a non-empty list of conversations")
        if isinstance(conversations[0], dict):
            raise ValueError("apply_chat takes a list of conversations; wrap a single conversation in a list")
        texts, images, n_images = [], [], []
        for b, conv in enumerate(conversations):
            texts.append(self.render(conv, add_generation_prompt))
            conv_images = [item for msg in conv if isinstance(msg["content"], (list, tuple))
                           for item in msg["content"] if item["type"] == "image"]
            for item in conv_images:
                if "image" not in item:
                    raise ValueError(f"conversation {b}: image item without an 'image' key: {item!r:.200}")
            images += [item["image"] for item in conv_images]
            n_images.append(len(conv_images))
        pixel_values, grid = self.image_processor(images) if images else (None, None)
        ids, start = [], 0
        for text, n in zip(texts, n_images):
            ids.append(self.encode(text, grid[start:start + n] if n else None))
            start += n
        input_ids, attention_mask = pad(ids, self.pad_id, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pixel_values": pixel_values, "image_grid_thw": grid}


def pad(seqs: list, pad_id: int, side: str = "left", multiple: int = 1) -> tuple:
    """Token-id lists -> ids (B, S) and attention mask (B, S) of 0/1, S the longest rounded up to `multiple`."""
    S = -(-max(len(s) for s in seqs) // multiple) * multiple
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        cols = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[b, cols], mask[b, cols] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask
