"""LoRA adapters in peft's file format: `adapter_model.safetensors` + `adapter_config.json` in one directory, as
`peft.PeftModel.save_pretrained` writes them, so a minigmr adapter loads in `peft.PeftModel.from_pretrained` and
a peft adapter loads here.

peft names a tensor `base_model.model.<module path in the transformers model>.lora_A.weight` (A: (r, in)) or
`.lora_B.weight` (B: (out, r)); see `peft.utils.save_and_load.get_peft_model_state_dict`. The module path is the
in-memory one, which transformers 4.52 changed (docs/qwen25vl.md §2.2, B.8):
    old: model.layers.N.self_attn.q_proj   visual.blocks.N.attn.qkv
    new: model.language_model.layers.N...  model.visual.blocks.N...
We load both and write the new one, which current peft loads without renaming.

Only plain LoRA is read: the options of `peft.LoraConfig` that change the computation are refused by name, and
so is a pickled `adapter_model.bin` (minigmr never unpickles).
"""
import math
import os
import re

import torch
import torch.nn as nn

from .files import open_safetensors, read_json_object, write_json, write_safetensors
from .lora import LoRALinear, lora_modules, replace_module
from .weights import to_hf, to_ours

PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

# peft LoraConfig options under which the saved A, B no longer mean h = x W^T + b + scaling * B A x on the
# unchanged base model (peft.tuners.lora.config.LoraConfig). Each must be off; use_rslora only changes the
# scaling (alpha / sqrt(r)) and is read.
NOT_PLAIN_LORA = {
    "use_dora": "DoRA: a magnitude vector and a column norm",
    "rank_pattern": "per-module r",
    "alpha_pattern": "per-module alpha",
    "bias": "trained base biases (anything but 'none')",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "full trained copies of other modules",
    "layer_replication": "repeated decoder layers",
    "alora_invocation_tokens": "activated LoRA: the update starts after given tokens",
}
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")  # the adapter assumes a modified W


def _hf_module(our_module: str) -> str:
    """Our module name -> transformers >= 4.52 in-memory module name (what peft writes)."""
    disk = to_hf(our_module + ".weight")[: -len(".weight")]  # official on-disk name
    if disk.startswith("visual."):
        return "model." + disk  # visual.X -> model.visual.X
    if disk.startswith("model."):
        return "model.language_model." + disk[len("model."):]  # model.X -> model.language_model.X
    return disk  # lm_head


def save_adapter(model: nn.Module, directory: str, extra_config: dict = None) -> None:
    """Write the model's LoRA weights as a peft adapter in `directory` (each file atomically). `extra_config` adds
    keys to adapter_config.json (e.g. base_model_name_or_path); it may not set the ones that define the maths."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers")
    hyper = {(m.rank, m.scaling, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for m in mods.values()}
    if len(hyper) > 1:
        raise ValueError(f"save_adapter: LoRA layers differ in (rank, scaling, dropout): {sorted(hyper)}; one "
                         "adapter_config.json holds one of each")
    ((rank, scaling, dropout),) = hyper
    alpha = scaling * rank  # peft scaling = lora_alpha / r (an rsLoRA adapter is re-expressed this way)
    hf_names = {name: _hf_module(name) for name in mods}
    config = {  # peft fills every other LoraConfig option with its default, i.e. plain LoRA
        "peft_type": "LORA", "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout, "bias": "none", "use_rslora": False,
        # exact module names: peft matches a list entry by full name, so a text gate_proj target does not also
        # hit the vision gate_proj (peft.tuners.tuners_utils.check_target_module_exists)
        "target_modules": list(hf_names.values()),
    }
    clash = sorted((set(config) | set(NOT_PLAIN_LORA)) & set(extra_config or {}))
    if clash:
        raise ValueError(f"save_adapter: extra_config may not override {clash}; they come from the model")
    config = {"task_type": None, "base_model_name_or_path": None, "inference_mode": True, **config,
              **(extra_config or {})}
    tensors = {}
    for name, m in mods.items():
        tensors[f"{PEFT_PREFIX}{hf_names[name]}.lora_A.weight"] = m.lora_a.detach().cpu().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{hf_names[name]}.lora_B.weight"] = m.lora_b.detach().cpu().contiguous()  # (out, r)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors)
    write_json(os.path.join(directory, "adapter_config.json"), config)


def _number(value) -> bool:
    """An int or float that JSON wrote as a number (a bool is not one, though Python's isinstance says so)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _targeted(module: str, targets, excluded) -> bool:
    """Whether peft injects LoRA into `module` (its name as the adapter file spells it) under the config's
    target_modules / exclude_modules: a string is a full regex match, a list matches a whole name or a
    trailing `.name` (peft.tuners.tuners_utils.check_target_module_exists); None / "all-linear" take all."""
    def hit(rule):
        if isinstance(rule, str):
            return re.fullmatch(rule, module) is not None
        return any(module == t or module.endswith("." + t) for t in rule)
    return (targets in (None, "all-linear") or hit(targets)) and not (excluded and hit(excluded))


def _read_config(directory: str):
    """adapter_config.json -> (its path, r, scaling, dropout, the config); refuses what is not plain LoRA and
    fields of the wrong type."""
    path = os.path.join(directory, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no adapter_config.json in {directory}")
    cfg = read_json_object(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not 'LORA'")
    on = {k: cfg.get(k) for k in NOT_PLAIN_LORA}
    on["bias"] = cfg.get("bias", "none") != "none"
    bad = {k: v for k, v in on.items() if v}
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        bad["init_lora_weights"] = init
    if bad:
        raise ValueError(f"{path}: unsupported peft LoRA option(s) {bad}; minigmr loads plain LoRA only "
                         f"({'; '.join(NOT_PLAIN_LORA.get(k, 'rewrites the base weights') for k in bad)})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or not _number(alpha):
        raise ValueError(f"{path}: needs a positive integer 'r' and a numeric 'lora_alpha', got r={r!r} "
                         f"lora_alpha={alpha!r}")
    rslora, dropout = cfg.get("use_rslora") or False, cfg.get("lora_dropout") or 0.0  # null = peft's default
    if not isinstance(rslora, bool):
        raise ValueError(f"{path}: 'use_rslora' must be true or false, got {rslora!r}")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    for key in ("target_modules", "exclude_modules"):
        value = cfg.get(key)
        if not (value is None or isinstance(value, str) or
                isinstance(value, list) and all(isinstance(t, str) for t in value)):
            raise ValueError(f"{path}: '{key}' must be a string (a regex), a list of names or null, got {value!r}")
    scaling = alpha / math.sqrt(r) if rslora else alpha / r  # rsLoRA: alpha / sqrt(r)
    return path, r, scaling, float(dropout), cfg


def _read_pairs(directory: str, targets=None, excluded=None):
    """adapter_model.safetensors -> (its path, {our module name: {"A": (key, tensor), "B": (key, tensor)}}).
    A tensor of a module that target_modules / exclude_modules leave out is refused: peft would not load it."""
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "adapter_model.bin")):
            raise FileNotFoundError(f"{directory} has only a pickled adapter_model.bin, which minigmr does not "
                                    "load; convert it to adapter_model.safetensors (peft's save_pretrained "
                                    "writes safetensors by default)")
        raise FileNotFoundError(f"no adapter_model.safetensors in {directory}")
    pairs = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            m = _PEFT_KEY.match(key)  # also `lora_A.default.weight`, as in a raw PeftModel state_dict
            if m is None:
                raise ValueError(f"{path}: unexpected tensor {key!r}; expected "
                                 f"'{PEFT_PREFIX}<module>.lora_A.weight' or '.lora_B.weight'")
            if not _targeted(m["module"], targets, excluded):
                raise ValueError(f"{path}: tensor {key!r} is for {m['module']!r}, which adapter_config.json's "
                                 f"target_modules {targets!r} / exclude_modules {excluded!r} leave out, so peft "
                                 "would not load it")
            try:
                ours = to_ours(m["module"] + ".weight")[: -len(".weight")]
            except KeyError:
                raise ValueError(f"{path}: tensor {key!r} names a module {m['module']!r} that Qwen2.5-VL "
                                 "does not have") from None
            if m["ab"] in pairs.setdefault(ours, {}):  # two adapters, or both key layouts, in one file
                raise ValueError(f"{path}: {key!r} and {pairs[ours][m['ab']][0]!r} are both lora_{m['ab']} of "
                                 f"{ours!r}; keep one adapter")
            pairs[ours][m["ab"]] = (key, f.get_tensor(key))
    return path, pairs


def load_adapter(model: nn.Module, directory: str) -> list:
    """Load a peft (or minigmr) LoRA adapter into `model`, injecting LoRALinear where needed with the config's
    r and lora_alpha (as `peft.utils.save_and_load.set_peft_model_state_dict` fills a PeftModel). Every tensor
    must be used and every shape must match; nothing in the model changes unless all checks pass. Returns the
    adapted module names in model order."""
    cfg_path, rank, scaling, dropout, cfg = _read_config(directory)
    path, pairs = _read_pairs(directory, cfg.get("target_modules"), cfg.get("exclude_modules"))
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
        for a_or_b, want in (("A", (rank, mod.in_features)), ("B", (mod.out_features, rank))):
            key, t = ab[a_or_b]
            if tuple(t.shape) != want:
                raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {want} "
                                 f"(r={rank} from {cfg_path})")
    uncovered = sorted(set(lora_modules(model)) - set(pairs))
    if uncovered:
        raise ValueError(f"{path}: the model already has LoRA layers this adapter does not cover, e.g. "
                         f"{uncovered[:3]}; load into a model without LoRA or with the same targets")

    for name, ab in pairs.items():
        mod = modules[name]
        if not isinstance(mod, LoRALinear):
            mod = LoRALinear(mod, rank, alpha=scaling * rank, dropout=dropout)
            mod.train(model.training)  # as peft: a model loaded for inference gets eval-mode (no dropout) layers
            replace_module(model, name, mod)
        mod.alpha, mod.scaling = scaling * rank, scaling
        with torch.no_grad():
            mod.lora_a.copy_(ab["A"][1])
            mod.lora_b.copy_(ab["B"][1])
    return [n for n in modules if n in pairs]
