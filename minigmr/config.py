"""Configuration of a Qwen2.5-VL checkpoint: one flat dataclass per part.

`Config.from_json(path)` reads a checkpoint's `config.json` in either of the two formats found in the wild
(docs/qwen25vl.md §1, Appendix B.2):
  - the flat official format (Hub files of Qwen/Qwen2.5-VL-*-Instruct): text fields at the top level,
    `rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}`, `rope_theta`, `vision_config.in_chans`;
  - the nested format newer `transformers` (5.x) writes: `text_config{...}` with `rope_parameters{...}`,
    `vision_config{in_channels, ...}`, and the special-token ids at the top level.
`Config.save(directory)` writes the flat official format, so a minigmr checkpoint loads in `transformers`
unchanged.

Class defaults here are the checkpoint values of Qwen2.5-VL-3B, not transformers' class defaults
(which differ: vision hidden_size 3584, tokens_per_second 4; docs/qwen25vl.md pitfall §7.11).
"""
import os
from dataclasses import asdict, dataclass, field, fields, replace

from .files import read_json_object, write_json


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280  # ViT width
    intermediate_size: int = 3420  # gated MLP width
    num_heads: int = 16  # head_dim = 1280 / 16 = 80
    out_hidden_size: int = 2048  # merger output = text hidden_size
    patch_size: int = 14
    spatial_merge_size: int = 2  # 2x2 patches -> one LLM token
    temporal_patch_size: int = 2  # a still image is repeated over 2 frames
    window_size: int = 112  # window attention side in pixels (= 4x4 merged tokens)
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    tokens_per_second: int = 2  # video only; kept so the config round-trips
    rms_norm_eps: float = 1e-6  # hard-coded 1e-6 in transformers' vision blocks and merger
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # (temporal, height, width), sums to head_dim/2
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    # special-token ids the model itself needs (top level of config.json)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


POSITIVE = {"depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size", "patch_size",
            "spatial_merge_size", "temporal_patch_size", "window_size", "in_channels", "vocab_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta"}


def checked_fields(part, values: dict, source: str, where: str) -> dict:
    """config.json is user input: each field must have its dataclass type (JSON int / number / bool / str / list of
    ints), sizes must be positive, and only the SiLU activation is implemented. Errors name file and field."""
    types = {f.name: f.type for f in fields(part)}
    for name, value in values.items():
        want, is_int = types[name], isinstance(value, int) and not isinstance(value, bool)
        ok = {int: is_int, float: is_int or isinstance(value, float), bool: isinstance(value, bool),
              str: isinstance(value, str),
              list: isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)}
        if not ok[want]:
            kind = "a list of integers" if want is list else f"a JSON {'number' if want is float else want.__name__}"
            raise ValueError(f"{source}: {where}{name} must be {kind}, got {value!r}")
        if name in POSITIVE and not value > 0:
            raise ValueError(f"{source}: {where}{name} must be > 0, got {value!r}")
    if values.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: {where}hidden_act {values['hidden_act']!r} is not implemented (only 'silu', "
                         "as every Qwen2.5-VL checkpoint)")
    return values


@dataclass
class Config:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    dtype: str = "bfloat16"  # storage dtype recorded in config.json

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.hidden_size % t.num_attention_heads or t.num_attention_heads % t.num_key_value_heads:
            raise ValueError(f"text: hidden_size {t.hidden_size} / heads {t.num_attention_heads} / kv heads "
                             f"{t.num_key_value_heads} do not divide evenly")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(f"text: mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
        if v.hidden_size % v.num_heads or (v.head_dim // 2) % 2:
            raise ValueError(f"vision: hidden_size {v.hidden_size} / num_heads {v.num_heads} must give a head_dim "
                             f"divisible by 4 (2-D rotary), got {v.head_dim}")
        if v.out_hidden_size != t.hidden_size:
            raise ValueError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
        if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
            raise ValueError(f"vision: fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        """Both the flat official format and the nested transformers-5.x format."""
        for block in ("vision_config", "text_config", "rope_scaling", "rope_parameters"):
            if d.get(block) is not None and not isinstance(d[block], dict):
                raise ValueError(f"{source}: {block!r} must be a JSON object, got {d[block]!r}")
        if d.get("model_type") not in (None, "qwen2_5_vl"):
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'qwen2_5_vl'")
        if "vision_config" not in d:
            raise ValueError(f"{source}: no 'vision_config' block; is this a Qwen2.5-VL checkpoint?")
        tc = dict(d.get("text_config") or {})
        if not isinstance(tc.get("rope_parameters") or {}, dict):
            raise ValueError(f"{source}: text_config.rope_parameters must be a JSON object")
        flat = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        # nested (5.x) wins over the flat copy that 4.5x re-saves keep beside it
        src = {**flat, **tc}
        rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
        text_kw = {f.name: src[f.name] for f in fields(TextConfig) if f.name in src}
        text_kw["rope_theta"] = rope.get("rope_theta", src.get("rope_theta", TextConfig.rope_theta))
        if "mrope_section" in rope:
            text_kw["mrope_section"] = list(rope["mrope_section"])
        # special-token ids and the head tying live at the top level in both formats
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                  "tie_word_embeddings"):
            if k in d:
                text_kw[k] = d[k]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads") if k not in text_kw]
        if missing:
            raise ValueError(f"{source}: text fields missing: {missing}")
        vc = dict(d["vision_config"])
        vis_kw = {f.name: vc[f.name] for f in fields(VisionConfig) if f.name in vc}
        if "in_chans" in vc:  # official checkpoint spelling (docs/qwen25vl.md §1.2)
            vis_kw["in_channels"] = vc["in_chans"]
        if isinstance(vc.get("rope_parameters"), dict):
            vis_kw["rope_theta"] = vc["rope_parameters"].get("rope_theta", VisionConfig.rope_theta)
        for k in ("depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size"):
            if k not in vis_kw:
                raise ValueError(f"{source}: vision_config.{k} missing")
        dtype = d.get("torch_dtype") or d.get("dtype") or tc.get("dtype") or "bfloat16"
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{source}: torch_dtype {dtype!r} is not one of float32, bfloat16, float16")
        text = TextConfig(**checked_fields(TextConfig, text_kw, source, ""))
        vision = VisionConfig(**checked_fields(VisionConfig, vis_kw, source, "vision_config."))
        try:
            return cls(text, vision, dtype=dtype)
        except ValueError as e:  # the shape checks of __post_init__, located
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str) -> "Config":
        """`path` is a config.json or a checkpoint directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(read_json_object(path), source=path)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """The flat official format (as the Hub checkpoints; transformers 4.x and 5.x both read it)."""
        t, v = asdict(self.text), asdict(self.vision)
        special = {k: t.pop(k) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                         "vision_end_token_id")}
        mrope, theta = t.pop("mrope_section"), t.pop("rope_theta")
        tie = t.pop("tie_word_embeddings")
        rope = {"type": "mrope", "mrope_section": mrope}
        vision = {k: v[k] for k in v if k not in ("rms_norm_eps", "rope_theta")}
        vision.update(in_chans=v["in_channels"], model_type="qwen2_5_vl")
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            **t, "rope_theta": theta, "rope_scaling": rope, "tie_word_embeddings": tie,
            "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": t["num_hidden_layers"],
            "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": self.dtype, **special,
            "vision_token_id": special["vision_start_token_id"] + 2,
            "vision_config": vision,
        }

    def save(self, directory: str) -> None:
        write_json(os.path.join(directory, "config.json"), self.to_dict())

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "Config":
        """The official shapes (docs/qwen25vl.md §1): '3b' (tied head) or '7b' (untied head)."""
        if name == "3b":
            return cls()
        if name == "7b":
            return cls(TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                  num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
                       VisionConfig(out_hidden_size=3584))
        raise ValueError(f"unknown preset {name!r}: use '3b' or '7b'")

    def replace(self, text: dict = None, vision: dict = None, **kw) -> "Config":
        """A copy with some fields changed, e.g. for tiny test configs."""
        return Config(replace(self.text, **(text or {})), replace(self.vision, **(vision or {})),
                      **{"dtype": self.dtype, **kw})
