"""Loading and saving Hugging Face safetensors checkpoints of Qwen2.5-VL.

The map below is the whole story: checkpoint names on the left, minigmr's module names on the right. Tensor
layouts are kept as in the checkpoint (separate q/k/v, Conv3d patch weight, fused vision qkv), so loading is pure
renaming. Two on-disk layouts exist (docs/qwen25vl.md §2.2): the official one (`visual.*`, `model.*`) and the one
transformers >= 4.52 saves (`model.visual.*`, `model.language_model.*`); both are accepted, the official one is
written.

Loading is lazy and loud: `load_into` fills a model built on the meta device (no memory, see
`Qwen25VL.from_pretrained`): each shard is opened with `safe_open` and every tensor is read, renamed, shape-checked,
cast and assigned, one copy of the weights at a time. Every checkpoint key must be consumed and every parameter
filled, otherwise a ValueError names the keys and file. This module never imports the model: model.py imports it.
"""
import os
import re
from dataclasses import replace

import torch

from .files import open_safetensors, read_json, write_json, write_safetensors

# checkpoint name (official layout; {} = block/layer number) -> minigmr name
WEIGHT_MAP = {
    "visual.patch_embed.proj.weight": "vision.patch_embed.weight",
    "visual.blocks.{}.norm1.weight": "vision.blocks.{}.norm1.weight",
    "visual.blocks.{}.norm2.weight": "vision.blocks.{}.norm2.weight",
    "visual.blocks.{}.attn.qkv.weight": "vision.blocks.{}.attn.qkv.weight",
    "visual.blocks.{}.attn.qkv.bias": "vision.blocks.{}.attn.qkv.bias",
    "visual.blocks.{}.attn.proj.weight": "vision.blocks.{}.attn.proj.weight",
    "visual.blocks.{}.attn.proj.bias": "vision.blocks.{}.attn.proj.bias",
    "visual.blocks.{}.mlp.gate_proj.weight": "vision.blocks.{}.mlp.gate_proj.weight",
    "visual.blocks.{}.mlp.gate_proj.bias": "vision.blocks.{}.mlp.gate_proj.bias",
    "visual.blocks.{}.mlp.up_proj.weight": "vision.blocks.{}.mlp.up_proj.weight",
    "visual.blocks.{}.mlp.up_proj.bias": "vision.blocks.{}.mlp.up_proj.bias",
    "visual.blocks.{}.mlp.down_proj.weight": "vision.blocks.{}.mlp.down_proj.weight",
    "visual.blocks.{}.mlp.down_proj.bias": "vision.blocks.{}.mlp.down_proj.bias",
    "visual.merger.ln_q.weight": "vision.merger.norm.weight",
    "visual.merger.mlp.0.weight": "vision.merger.fc1.weight",
    "visual.merger.mlp.0.bias": "vision.merger.fc1.bias",
    "visual.merger.mlp.2.weight": "vision.merger.fc2.weight",
    "visual.merger.mlp.2.bias": "vision.merger.fc2.bias",
    "model.embed_tokens.weight": "text.embed_tokens.weight",
    "model.layers.{}.input_layernorm.weight": "text.layers.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "text.layers.{}.attn.q_proj.weight",
    "model.layers.{}.self_attn.q_proj.bias": "text.layers.{}.attn.q_proj.bias",
    "model.layers.{}.self_attn.k_proj.weight": "text.layers.{}.attn.k_proj.weight",
    "model.layers.{}.self_attn.k_proj.bias": "text.layers.{}.attn.k_proj.bias",
    "model.layers.{}.self_attn.v_proj.weight": "text.layers.{}.attn.v_proj.weight",
    "model.layers.{}.self_attn.v_proj.bias": "text.layers.{}.attn.v_proj.bias",
    "model.layers.{}.self_attn.o_proj.weight": "text.layers.{}.attn.o_proj.weight",
    "model.layers.{}.post_attention_layernorm.weight": "text.layers.{}.mlp_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "text.layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "text.layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "text.layers.{}.mlp.down_proj.weight",
    "model.norm.weight": "text.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_REVERSE = {v: k for k, v in WEIGHT_MAP.items()}
_NUM = re.compile(r"\b(blocks|layers)\.(\d+)\.")  # block/layer numbers only, not the 0/2 of merger.mlp.0


def _lookup(name: str, table: dict) -> str:
    nums = [n for _, n in _NUM.findall(name)]
    template = _NUM.sub(r"\1.{}.", name)
    if template not in table:
        raise KeyError(name)
    return table[template].format(*nums)


def to_ours(hf_name: str) -> str:
    """Checkpoint name in either layout -> minigmr name; KeyError if it is not a Qwen2.5-VL tensor."""
    if hf_name.startswith("model.visual."):  # transformers >= 4.52 layout
        hf_name = hf_name[len("model."):]
    elif hf_name.startswith("model.language_model."):
        hf_name = "model." + hf_name[len("model.language_model."):]
    return _lookup(hf_name, WEIGHT_MAP)


def to_hf(our_name: str) -> str:
    """minigmr name -> official checkpoint name."""
    return _lookup(our_name, _REVERSE)


def checkpoint_files(path: str) -> list:
    """The safetensors files of a checkpoint directory: `model.safetensors`, or the shards of
    `model.safetensors.index.json` (every shard must exist)."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        weight_map = read_json(index)
        if not isinstance(weight_map, dict) or "weight_map" not in weight_map:
            raise ValueError(f"{index}: not a valid safetensors index (a JSON object with a 'weight_map')")
        weight_map = weight_map["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        outside = [s for s in files if os.path.dirname(os.path.normpath(s)) not in ("",)]
        if outside:  # shards live beside the index, as the Hub writes them
            raise ValueError(f"{index}: shard names must be plain file names in {path}, got {outside[:3]}")
        missing = [s for s in files if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return [os.path.join(path, s) for s in files]
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")


def load_into(model: torch.nn.Module, path: str, dtype=torch.float32, device="cpu") -> None:
    """Fill every parameter of `model` (a Qwen25VL, typically on the meta device) from the safetensors of the
    checkpoint directory `path`, cast to `dtype` on `device`."""
    params = dict(model.named_parameters())
    filled, unexpected, mismatched = set(), [], []
    extra_head = None  # a tied checkpoint may still store lm_head.weight: accepted only if equal to the embedding
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                try:
                    ours = to_ours(key)
                except KeyError:
                    unexpected.append(key)
                    continue
                if ours == "lm_head.weight" and model.lm_head is None:
                    extra_head = f.get_tensor(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(params[ours].shape):
                    mismatched.append(f"{key}: checkpoint {shape} vs model {tuple(params[ours].shape)}")
                    continue
                if ours in filled:
                    raise ValueError(f"{file}: tensor {key} appears twice in the checkpoint")
                tensor = f.get_tensor(key).to(device=device, dtype=dtype)
                module_name, _, attr = ours.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=params[ours].requires_grad))
                filled.add(ours)
    missing = sorted(set(params) - filled)
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not part of Qwen2.5-VL): {sorted(unexpected)[:20]}")
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:20]))
    if missing:
        problems.append(f"missing keys: {[to_hf(m) for m in missing][:20]}")
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json: " + " | ".join(problems))
    if extra_head is not None and not torch.equal(extra_head.to(dtype), model.text.embed_tokens.weight.cpu()):
        raise ValueError(f"{path}: config says tie_word_embeddings=true but lm_head.weight differs from "
                         "model.embed_tokens.weight")


def save_checkpoint(model, path: str, dtype=None, max_shard_bytes=None) -> None:
    """Write config.json + model.safetensors (or shards + index) with the official key names, so the directory
    loads unchanged in transformers. LoRA layers must be merged/removed first (see lora.py)."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, p in model.state_dict().items():
        try:
            hf = to_hf(name)
        except KeyError:
            raise ValueError(f"cannot save parameter {name!r} in the official layout (merge LoRA first?)") from None
        t = p.detach()
        tensors[hf] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    stored = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    replace(model.config, dtype=stored).save(path)  # config.json records the dtype on disk; the model's is untouched
    if not max_shard_bytes:
        write_safetensors(os.path.join(path, "model.safetensors"), tensors)
        return
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, name), shard)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(os.path.join(path, "model.safetensors.index.json"), {"metadata": {"total_size": total},
                                                                    "weight_map": weight_map})
