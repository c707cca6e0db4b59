"""LoRA: low-rank adapters on the frozen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models", arXiv 2106.09685).

A frozen pretrained projection W (out, in) gets a trainable low-rank update B A, with rank r << min(in, out):

                 h (out)
                    ^
                    |
                   (+) <------------------ * scaling (= alpha / r)
                    ^                          ^
                    |                          |
         +---------------------+        +-------------+
         |  W (out, in), b     |        | B (out, r)  |  zeros at init, so training starts at the base model
         |  pretrained, frozen |        +-------------+
         +---------------------+               ^
                    ^                   +-------------+
                    |                   | A (r, in)   |  kaiming-uniform at init (as peft)
                    |                   +-------------+
                    |                          ^
                    |                       dropout
                    |                          |
                 x (in) -----------------------+

    h = x W^T + b + scaling * dropout(x) A^T B^T        merged:  W' = W + scaling * B A,  h = x W'^T + b

Design (ecosystem.md A.3 items 6, 7, 11):
  - `LoRALinear` registers `weight` and `bias` on itself, as torchtune's LoRALinear does, so the base checkpoint
    keys (`text.layers.0.attn.q_proj.weight`) are unchanged by injection and base weights load without remapping.
    `lora_a` (r, in) and `lora_b` (out, r) have exactly the shapes of peft's `lora_A.weight` / `lora_B.weight`.
  - `disable_adapters(model)` (torchtune's `disable_adapter`) turns every adapter off, so the same model in the
    same memory is the frozen DPO reference policy.
  - `save_adapter` / `load_adapter` use the peft file format (adapter_model.safetensors + adapter_config.json),
    so a minigmr adapter loads in `peft.PeftModel.from_pretrained` and a peft adapter loads here.

Defaults: the GMR paper (gmr.md) trains LoRA with rank 16 on the text decoder; it does not report alpha or
dropout. We use alpha = 32 (= 2r, the common peft / LLaMA-Factory choice, scaling 2) and dropout 0.0 (the
dropout is only a regulariser; 0 keeps training deterministic given the seed). Both are arguments.
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from .weights import to_hf, to_ours

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # in text.layers[i]
VISION_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")  # in vision.blocks[i]


class LoRALinear(nn.Module):
    """A `nn.Linear` plus a low-rank update; adopts the base layer's own `weight`/`bias` Parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in): same Parameter object, same state_dict key
        self.bias = base.bias  # (out,) or None
        w = base.weight
        self.lora_a = nn.Parameter(torch.zeros(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True: W already holds W + scaling * B A
        self.disabled = False  # True: forward is the base layer only (DPO reference)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, generator: torch.Generator = None) -> None:
        """A ~ kaiming_uniform(a=sqrt(5)) and B = 0, as peft's `LoraLayer.reset_lora_parameters`. A is drawn in
        fp32 on the CPU and then copied, so a seeded generator gives the same A on every device and dtype."""
        a = torch.empty(self.lora_a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # bound = 1/sqrt(in)
        with torch.no_grad():
            self.lora_a.copy_(a)
            self.lora_b.zero_()

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, (out, in), in fp32 (bf16 products lose the small update against W)."""
        return self.scaling * (self.lora_b.float() @ self.lora_a.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged:
            if self.disabled:
                raise RuntimeError("LoRALinear: adapters are merged into the weight and cannot be disabled; "
                                   "unmerge first")
            return out
        if self.disabled:
            return out
        # the LoRA branch runs in the adapter's dtype (which may be fp32 over a bf16 base), as peft does
        h = F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a)  # (..., r)
        return out + (self.scaling * F.linear(h, self.lora_b)).to(out.dtype)  # (..., out)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A (computed in fp32, cast back to W's dtype). No-op if already merged."""
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A. Exact up to rounding in fp32; in bf16 the round trip loses low bits."""
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def lora_modules(model: nn.Module) -> dict:
    """{module name: LoRALinear} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, rank: int = 16, alpha: float = 32, dropout: float = 0.0,
                targets=TEXT_TARGETS, vision_targets=(), seed: int = None) -> list:
    """Replace, in place, the `nn.Linear`s named in `targets` inside `model.text.layers` and those named in
    `vision_targets` inside `model.vision.blocks` by LoRALinear (same device and dtype). Returns their names,
    e.g. ["text.layers.0.attn.q_proj", ...]. `seed` makes the A init reproducible."""
    for given, allowed, where in ((targets, TEXT_TARGETS, "text"), (vision_targets, VISION_TARGETS, "vision")):
        if isinstance(given, str):
            raise ValueError(f"{where} targets must be a list of names, got the string {given!r}")
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {where} LoRA target(s) {unknown}; choose from {list(allowed)}")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    chosen = [(f"text.layers.{i}.", layer, set(targets)) for i, layer in enumerate(model.text.layers)]
    chosen += [(f"vision.blocks.{i}.", block, set(vision_targets)) for i, block in enumerate(model.vision.blocks)]
    replaced = []
    for prefix, root, names in chosen:
        for sub, m in list(root.named_modules()):
            if sub.rpartition(".")[2] not in names:
                continue
            if isinstance(m, LoRALinear):
                raise ValueError(f"{prefix + sub} already has LoRA; inject_lora was called twice")
            if type(m) is not nn.Linear:
                continue
            lora = LoRALinear(m, rank, alpha, dropout)
            lora.reset_lora_parameters(generator)
            _replace(root, sub, lora)
            replaced.append(prefix + sub)
    if not replaced:
        raise ValueError(f"inject_lora matched no nn.Linear for targets={list(targets)} "
                         f"vision_targets={list(vision_targets)}")
    return replaced


def lora_parameters(model: nn.Module) -> list:
    """The A and B Parameters of every LoRALinear, in model order (for the optimizer)."""
    return [p for m in lora_modules(model).values() for p in (m.lora_a, m.lora_b)]


def mark_only_lora_trainable(model: nn.Module, also_train=()) -> int:
    """requires_grad = True for the LoRA A/B Parameters and for every Parameter whose name starts with one of
    `also_train` (e.g. "vision.merger", or "vision." to train the whole tower as in PIVOT); False for all the
    rest. Returns the number of trainable parameters."""
    if isinstance(also_train, str):
        also_train = (also_train,)
    named = dict(model.named_parameters())
    for prefix in also_train:
        if not any(n.startswith(prefix) for n in named):
            raise ValueError(f"mark_only_lora_trainable: no parameter name starts with {prefix!r}")
    lora = {id(p) for p in lora_parameters(model)}
    for n, p in named.items():
        p.requires_grad_(id(p) in lora or n.startswith(tuple(also_train)))
    n_train = sum(p.numel() for p in named.values() if p.requires_grad)
    if n_train == 0:
        raise ValueError("mark_only_lora_trainable: nothing is trainable (no LoRA layers; call inject_lora first)")
    return n_train


def merge_lora(model: nn.Module) -> list:
    """W <- W + scaling * B A in every LoRALinear (inference speed: no extra matmuls). Returns the names."""
    for m in lora_modules(model).values():
        m.merge()
    return list(lora_modules(model))


def unmerge_lora(model: nn.Module) -> list:
    for m in lora_modules(model).values():
        m.unmerge()
    return list(lora_modules(model))


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """`with disable_adapters(model): ...` runs the base model: the DPO reference policy without a second copy
    of the weights (mirrors torchtune's `disable_adapter`). Restores each layer's previous flag on exit."""
    mods = lora_modules(model)
    merged = [n for n, m in mods.items() if m.merged]
    if merged:
        raise RuntimeError(f"disable_adapters: {len(merged)} LoRA layers are merged (e.g. {merged[0]}); "
                           "call unmerge_lora(model) first")
    before = {n: m.disabled for n, m in mods.items()}
    try:
        for m in mods.values():
            m.disabled = True
        yield model
    finally:
        for n, m in mods.items():
            m.disabled = before[n]


def remove_lora(model: nn.Module) -> list:
    """Merge every adapter and turn each LoRALinear back into a plain nn.Linear holding W + scaling * B A, for
    exporting merged weights with `save_pretrained`. Returns the names."""
    names = []
    for name, m in lora_modules(model).items():
        m.merge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias  # the same (merged) Parameters
        _replace(model, name, lin)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- peft format
# peft names a LoRA tensor `base_model.model.<module path in the transformers model>.lora_A.weight`. The module
# path is the in-memory name, which changed in transformers 4.52 (qwen25vl.md §2.2, B.8):
#   old: model.layers.N.self_attn.q_proj   visual.blocks.N.attn.qkv
#   new: model.language_model.layers.N...  model.visual.blocks.N...
# We load both, and write the new one: peft 0.21 with transformers 5.x does not rename old keys and would
# silently leave such adapters at zero.
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _hf_module(our_module: str) -> str:
    """Our module name -> transformers >= 4.52 in-memory module name (what peft writes)."""
    disk = to_hf(our_module + ".weight")[: -len(".weight")]  # official on-disk name
    if disk.startswith("visual."):
        return "model." + disk  # visual.X -> model.visual.X
    if disk.startswith("model."):
        return "model.language_model." + disk[len("model."):]  # model.X -> model.language_model.X
    return disk  # lm_head


def _target_regex(model: nn.Module, hf_names: list) -> str:
    """peft `target_modules` as a regex (peft full-matches a string against module names) that hits exactly
    the adapted modules: the layer index becomes \\d+ when every layer has the adapter, else names are listed.
    A plain list such as ["q_proj", "proj"] would also hit vision gate_proj or the Conv3d patch_embed.proj."""
    groups = {}  # "model\.language_model\.layers\.\d+\." -> {"self_attn\.q_proj", ...}
    for n in hf_names:
        m = re.match(r"^(.*?\.(?:layers|blocks)\.)\d+\.(.+)$", n)
        if m is None:
            groups.setdefault("", set()).add(re.escape(n))
        else:
            groups.setdefault(re.escape(m[1]) + r"\d+\.", set()).add(re.escape(m[2]))
    regex = "|".join(p + "(" + "|".join(sorted(s)) + ")" for p, s in sorted(groups.items()))
    every_linear = [_hf_module(n) for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    if {n for n in every_linear if re.fullmatch(regex, n)} != set(hf_names):
        regex = "|".join(re.escape(n) for n in sorted(hf_names))  # adapters on only some layers
    return regex


def save_adapter(model: nn.Module, directory: str, extra_config: dict = None) -> None:
    """Write the LoRA weights as a peft adapter: `adapter_model.safetensors` and `adapter_config.json` in
    `directory`. Each file is written to a temporary name and then os.replace'd, so a crash never leaves a
    half-written file. `extra_config` adds keys to adapter_config.json (e.g. base_model_name_or_path);
    peft ignores keys it does not know, with a warning."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers")
    scalings = {m.scaling for m in mods.values()}
    ranks = {m.rank for m in mods.values()}
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for m in mods.values()}
    if len(scalings) > 1 or len(ranks) > 1 or len(dropouts) > 1:
        raise ValueError(f"save_adapter: LoRA layers differ in rank {sorted(ranks)}, scaling {sorted(scalings)} "
                         f"or dropout {sorted(dropouts)}; one adapter_config.json holds one of each")
    (rank,), (scaling,), (dropout,) = ranks, scalings, dropouts
    alpha = scaling * rank  # peft scaling = lora_alpha / r (an rslora adapter is re-expressed this way)
    tensors, hf_names = {}, []
    for name, m in mods.items():
        hf = _hf_module(name)
        hf_names.append(hf)
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = m.lora_a.detach().to("cpu").contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = m.lora_b.detach().to("cpu").contiguous()  # (out, r)
    config = {
        "peft_type": "LORA", "task_type": None, "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "target_modules": _target_regex(model, hf_names), "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True, "base_model_name_or_path": None, "revision": None,
        "auto_mapping": {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                         "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"},
    }
    fixed = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "use_dora",
             "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save"}
    clash = sorted(fixed & set(extra_config or {}))
    if clash:
        raise ValueError(f"save_adapter: extra_config may not override {clash}; they come from the model")
    config.update(extra_config or {})
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "adapter_model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    path = os.path.join(directory, "adapter_config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)


def _check_config(cfg: dict, path: str) -> float:
    """Refuse the peft options that change the maths we implement; return the scaling."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not 'LORA'")
    unsupported = {
        "use_dora": cfg.get("use_dora", False),  # DoRA: magnitude vector + column norm
        "rank_pattern": cfg.get("rank_pattern") or {},  # per-module r
        "alpha_pattern": cfg.get("alpha_pattern") or {},  # per-module alpha
        "bias": cfg.get("bias", "none") != "none",  # trained base biases
        "lora_bias": cfg.get("lora_bias", False),  # a bias on lora_B
        "fan_in_fan_out": cfg.get("fan_in_fan_out", False),  # Conv1D (GPT-2) layout
        "modules_to_save": cfg.get("modules_to_save") or None,  # full copies of other modules
        "trainable_token_indices": cfg.get("trainable_token_indices") or None,
        "target_parameters": cfg.get("target_parameters") or None,
        "layer_replication": cfg.get("layer_replication") or None,
        "alora_invocation_tokens": cfg.get("alora_invocation_tokens") or None,
        "use_qalora": cfg.get("use_qalora", False),
    }
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0].lower() in ("pissa", "olora", "corda", "loftq"):
        unsupported["init_lora_weights"] = init  # these also rewrite the base weights
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise ValueError(f"{path}: unsupported peft LoRA option(s) {bad}; minigmr loads plain LoRA only")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{path}: needs a positive integer 'r' and a numeric 'lora_alpha', got r={r!r} "
                         f"lora_alpha={alpha!r}")
    return alpha / math.sqrt(r) if cfg.get("use_rslora", False) else alpha / r  # rsLoRA: alpha / sqrt(r)


def _read_tensors(directory: str):
    path = os.path.join(directory, "adapter_model.safetensors")
    if os.path.exists(path):
        with safe_open(path, "pt") as f:
            return path, {k: f.get_tensor(k) for k in f.keys()}
    path = os.path.join(directory, "adapter_model.bin")  # older peft
    if os.path.exists(path):
        return path, torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no adapter_model.safetensors (or adapter_model.bin) in {directory}")


def load_adapter(model: nn.Module, directory: str) -> list:
    """Load a peft (or minigmr) LoRA adapter into `model`, injecting LoRALinear where needed with the config's
    r and lora_alpha. Accepts the old (`base_model.model.model.layers.N`, `base_model.model.visual`) and new
    (`base_model.model.model.language_model.layers.N`, `base_model.model.model.visual`) key prefixes and both
    `lora_A.weight` and `lora_A.default.weight`. Every tensor must be used and every shape must match; nothing
    in the model changes unless all checks pass. Returns the adapted module names."""
    cfg_path = os.path.join(directory, "adapter_config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"no adapter_config.json in {directory}")
    with open(cfg_path) as f:
        cfg = json.load(f)
    scaling = _check_config(cfg, cfg_path)
    rank = cfg["r"]
    path, tensors = _read_tensors(directory)

    pairs, adapter_names = {}, set()  # our module name -> {"A": tensor, "B": tensor}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{path}: unexpected tensor {key!r}; expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
        adapter_names.add(m["adapter"])
        try:
            ours = to_ours(m["module"] + ".weight")[: -len(".weight")]
        except KeyError:
            raise ValueError(f"{path}: tensor {key!r} names a module {m['module']!r} that Qwen2.5-VL "
                             "does not have") from None
        pairs.setdefault(ours, {})[m["ab"]] = (key, t)
    if len(adapter_names) > 1:
        raise ValueError(f"{path}: tensors of several adapters {sorted(map(str, adapter_names))}; keep one")

    modules = dict(model.named_modules())
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        mod = modules.get(name)
        if mod is None:
            raise ValueError(f"{path}: {ab['A'][0]!r} targets {name!r}, which this model does not have "
                             "(an adapter for a different model size?)")
        if type(mod) is not nn.Linear and not isinstance(mod, LoRALinear):
            raise ValueError(f"{path}: {ab['A'][0]!r} targets {name!r}, which is not an adaptable nn.Linear "
                             f"in this model (got {type(mod).__name__})")
        if name == "lm_head":  # Qwen25VL reads lm_head.weight directly (head_weight), so LoRA would be ignored
            raise ValueError(f"{path}: LoRA on lm_head is not supported (Qwen25VL uses lm_head.weight directly)")
        if isinstance(mod, LoRALinear) and (mod.merged or mod.rank != rank):
            raise ValueError(f"{name}: the model's LoRA layer (rank {mod.rank}, merged={mod.merged}) cannot take "
                             f"the rank-{rank} adapter in {path}; unmerge it or load into a model without LoRA")
        for ab_key, want in (("A", (rank, mod.in_features)), ("B", (mod.out_features, rank))):
            key, t = ab[ab_key]
            if tuple(t.shape) != want:
                raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {want} "
                                 f"(r={rank} from {cfg_path})")
    uncovered = sorted(set(lora_modules(model)) - set(pairs))
    if uncovered:
        raise ValueError(f"{path}: the model already has LoRA layers this adapter does not cover, e.g. "
                         f"{uncovered[:3]}; load into a model without LoRA or with the same targets")

    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    for name, ab in pairs.items():
        mod = modules[name]
        if not isinstance(mod, LoRALinear):
            mod = LoRALinear(mod, rank, alpha=scaling * rank, dropout=dropout)
            _replace(model, name, mod)
        mod.alpha, mod.scaling = scaling * rank, scaling
        with torch.no_grad():
            mod.lora_a.copy_(ab["A"][1])
            mod.lora_b.copy_(ab["B"][1])
    return [n for n in modules if n in pairs]  # model order
