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

`LoRALinear` adopts the base layer's `weight` and `bias` Parameters, as `torchtune.modules.peft.LoRALinear` does,
so base checkpoint keys (`text.layers.0.attn.q_proj.weight`) survive injection; `lora_a` (r, in) and `lora_b`
(out, r) have the shapes of peft's `lora_A.weight` / `lora_B.weight` (`peft.tuners.lora.layer.Linear`), and
peft_io.py saves and loads them in peft's adapter format. `disable_adapters(model)` (torchtune's
`disable_adapter`) turns every adapter off: the same weights in the same memory are the frozen DPO reference.

Defaults: the GMR paper (arXiv 2510.14824; docs/gmr.md §3) trains LoRA with rank 16 on the text decoder and does
not report alpha or dropout. We use alpha = 32 (= 2r, the common peft choice, scaling 2) and dropout 0.0 (dropout
is only a regulariser; 0 keeps training deterministic given the seed). Both are arguments.
"""
import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # in text.layers[i]
VISION_TARGETS = ("qkv", "proj", "gate_proj", "up_proj", "down_proj")  # in vision.blocks[i]


class LoRALinear(nn.Module):
    """A `nn.Linear` plus a low-rank update; adopts the base layer's own `weight`/`bias` Parameters."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank <= 0:
            raise ValueError(f"LoRA rank must be positive (an integer), got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be a number in [0, 1), got {dropout!r}")
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
        if self.merged and self.disabled:
            raise RuntimeError("LoRALinear: adapters are merged into the weight and cannot be disabled; unmerge first")
        if self.merged or self.disabled:
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


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """model.<name> = new, for a dotted name such as "text.layers.0.attn.q_proj"."""
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
    replaced = []
    for tower, names in (("text.layers.", set(targets)), ("vision.blocks.", set(vision_targets))):  # text first
        for name, m in list(model.named_modules()):
            if not name.startswith(tower) or name.rpartition(".")[2] not in names:
                continue
            if isinstance(m, LoRALinear):
                raise ValueError(f"{name} already has LoRA; inject_lora was called twice")
            if type(m) is nn.Linear:
                lora = LoRALinear(m, rank, alpha, dropout)
                lora.reset_lora_parameters(generator)
                replace_module(model, name, lora)
                replaced.append(name)
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
        replace_module(model, name, lin)
        names.append(name)
    return names
