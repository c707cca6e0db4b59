"""LoRA layers (minigmr/lora.py) and their peft-format files (minigmr/peft_io.py): the LoRALinear maths against
the explicit formula, injection bookkeeping, and parity with peft (the oracle) on a tiny random Qwen2.5-VL: peft
adapters load here, minigmr adapters load in peft, merged weights match `merge_and_unload`, and both adapter key
layouts are accepted. fp32 on CPU."""
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hf_reference import hf_logits, image_tokens, random_pixels, save_tiny_hf, tiny_hf_model
from minigmr import lora
from minigmr.lora import (TEXT_TARGETS, LoRALinear, disable_adapters, inject_lora, lora_parameters,
                          mark_only_lora_trainable, merge_lora, remove_lora, unmerge_lora)
from minigmr.peft_io import load_adapter, save_adapter
from minigmr.model import Qwen25VL

peft = pytest.importorskip("peft")
TOL = dict(atol=1e-4, rtol=0)  # fp32 logits of two implementations (the brief's bound)


# ---------------------------------------------------------------------------------------------- LoRALinear
def _layer(seed=0, bias=True, dropout=0.0):
    torch.manual_seed(seed)
    m = LoRALinear(nn.Linear(8, 6, bias=bias), rank=3, alpha=6, dropout=dropout)
    with torch.no_grad():
        m.lora_b.normal_()  # B = 0 at init would make every check below trivial
    return m


def test_lora_linear_matches_formula():
    m, x = _layer(), torch.randn(2, 5, 8)
    want = x @ m.weight.T + m.bias + 2.0 * (x @ m.lora_a.T @ m.lora_b.T)  # scaling = alpha / r = 6 / 3
    torch.testing.assert_close(m(x), want, atol=1e-6, rtol=0)
    assert m.lora_a.shape == (3, 8) and m.lora_b.shape == (6, 3)  # peft lora_A.weight / lora_B.weight shapes


def test_lora_dropout_only_on_the_adapter_branch():
    m, x = _layer(dropout=0.5).train(), torch.randn(4, 8)
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    xd = F.dropout(x, 0.5, training=True)  # the same random draw
    torch.testing.assert_close(y, F.linear(x, m.weight, m.bias) + 2.0 * (xd @ m.lora_a.T @ m.lora_b.T),
                               atol=1e-6, rtol=0)
    m.eval()
    torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias) + 2.0 * (x @ m.lora_a.T @ m.lora_b.T),
                               atol=1e-6, rtol=0)


def test_merge_unmerge_disable():
    m, x = _layer(), torch.randn(3, 8)
    w0 = m.weight.detach().clone()
    base = F.linear(x, w0, m.bias)
    y = m(x)
    m.disabled = True
    assert torch.equal(m(x), base)  # adapters off = the base layer, bit for bit
    m.disabled = False
    m.merge()
    assert m.merged
    torch.testing.assert_close(m.weight.detach(), w0 + 2.0 * m.lora_b.detach() @ m.lora_a.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=0)
    m.merge()  # idempotent
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=0)
    m.unmerge()
    torch.testing.assert_close(m.weight.detach(), w0, atol=1e-6, rtol=0)  # exact up to fp32 rounding
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=0)
    m.merge()
    m.disabled = True
    with pytest.raises(RuntimeError, match="unmerge first"):
        m(x)


def test_init_like_peft_and_seeded():
    torch.manual_seed(0)
    a = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    assert torch.count_nonzero(a.lora_b) == 0
    assert a.lora_a.abs().max() <= 1 / 64 ** 0.5 and a.lora_a.std() > 0.3 / 64 ** 0.5  # kaiming_uniform(a=sqrt 5)
    x = torch.randn(2, 64)
    assert torch.equal(a(x), F.linear(x, a.weight, a.bias))  # B = 0: starts at the base model
    half = LoRALinear(nn.Linear(4, 4, dtype=torch.bfloat16), rank=2, alpha=4)
    assert half.lora_a.dtype == half.lora_b.dtype == torch.bfloat16  # keeps the base layer's dtype
    with pytest.raises(ValueError, match="rank must be positive"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)


@pytest.mark.parametrize("kw, match", [
    (dict(rank=2.5, alpha=1), r"rank must be positive \(an integer\), got 2.5"),
    (dict(rank=True, alpha=1), r"rank must be positive \(an integer\), got True"),
    (dict(rank=2, alpha=float("nan")), r"alpha must be a finite number, got nan"),
    (dict(rank=2, alpha=1, dropout=-0.1), r"dropout must be a number in \[0, 1\), got -0.1"),
    (dict(rank=2, alpha=1, dropout=1.5), r"dropout must be a number in \[0, 1\), got 1.5"),
])
def test_lora_linear_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kw)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_hf")
    save_tiny_hf(d, seed=0)
    return str(d)


def _ours(hf_dir):
    return Qwen25VL.from_pretrained(hf_dir).eval()


GRID = (1, 4, 4)  # 16 patches -> 4 <|image_pad|> tokens


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 400, (1, 12), generator=g)
    ids = torch.tensor([[5, 17, 300] + image_tokens(GRID) + [42, 7, 99, 250]])
    pv, thw = random_pixels([GRID], seed=1)
    return {"text": dict(input_ids=text), "image": dict(input_ids=ids, pixel_values=pv, image_grid_thw=thw)}


def _run(model, inp):
    with torch.no_grad():
        if isinstance(model, Qwen25VL):
            return model(**inp)
        return hf_logits(model, **inp)


PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv"]  # text + vision


def _peft_model(r=4, alpha=8, targets=PEFT_TARGETS, seed=0, **kw):
    pm = peft.get_peft_model(tiny_hf_model(seed=0), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                    target_modules=targets, **kw)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:  # B = 0 would make the adapter a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pm


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    pm = _peft_model()
    d = str(tmp_path_factory.mktemp("peft_adapter"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(d)
    return pm, d


def _copy_adapter(src, dst, rename=None, config=None, extra=None, drop=None):
    """Copy a saved adapter, renaming/dropping/adding tensors or editing the config."""
    os.makedirs(dst, exist_ok=True)
    sd = load_file(os.path.join(src, "adapter_model.safetensors"))
    sd = {(rename(k) if rename else k): v for k, v in sd.items() if not (drop and drop(k))}
    sd.update(extra or {})
    save_file(sd, os.path.join(dst, "adapter_model.safetensors"))
    with open(os.path.join(src, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.update(config or {})
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


# ---------------------------------------------------------------------------------------------- injection
def test_inject_keeps_base_keys(hf_dir):
    model = _ours(hf_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = inject_lora(model, rank=4, alpha=8, vision_targets=("qkv", "proj"), seed=0)
    assert len(names) == 2 * 7 + 2 * 2
    assert "text.layers.1.mlp.down_proj" in names and "vision.blocks.0.attn.proj" in names
    sd = model.state_dict()
    for k, v in before.items():
        assert torch.equal(sd[k], v), k  # base keys and values unchanged: base checkpoints still load
    assert set(sd) - set(before) == {f"{n}.{p}" for n in names for p in ("lora_a", "lora_b")}
    assert type(model.vision.blocks[0].mlp.gate_proj) is nn.Linear  # not a vision target here
    assert not isinstance(model.vision.patch_embed, LoRALinear)
    # seeded A is reproducible
    other = _ours(hf_dir)
    inject_lora(other, rank=4, alpha=8, vision_targets=("qkv", "proj"), seed=0)
    assert torch.equal(other.text.layers[1].attn.v_proj.lora_a, model.text.layers[1].attn.v_proj.lora_a)
    with pytest.raises(ValueError, match="called twice"):
        inject_lora(model)


def test_inject_errors(hf_dir):
    model = _ours(hf_dir)
    with pytest.raises(ValueError, match=r"unknown text LoRA target\(s\) \['qkv'\]"):
        inject_lora(model, targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match=r"unknown vision LoRA target\(s\) \['q_proj'\]"):
        inject_lora(model, vision_targets=("q_proj",))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_lora(model, targets=())


def test_trainable_flags_and_remove(hf_dir, inputs):
    model = _ours(hf_dir)
    names = inject_lora(model, rank=4, alpha=8, seed=0)
    for p in lora_parameters(model)[1::2]:
        torch.nn.init.normal_(p)
    n = mark_only_lora_trainable(model)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in names for p in ("lora_a", "lora_b")}
    assert n == sum(p.numel() for p in lora_parameters(model))
    mark_only_lora_trainable(model, also_train=("vision.merger",))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert {k for k in trainable if "lora" not in k} == {k for k, _ in model.named_parameters()
                                                          if k.startswith("vision.merger")}
    with pytest.raises(ValueError, match="no parameter name starts with 'vison.'"):
        mark_only_lora_trainable(model, also_train=("vison.",))

    mark_only_lora_trainable(model)
    model(**inputs["image"]).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    assert all(p.grad is None for k, p in model.named_parameters() if "lora" not in k)
    y = _run(model, inputs["image"])
    merge_lora(model)
    torch.testing.assert_close(_run(model, inputs["image"]), y, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with disable_adapters(model):
            pass
    unmerge_lora(model)
    torch.testing.assert_close(_run(model, inputs["image"]), y, atol=1e-5, rtol=0)
    base_keys = set(_ours(hf_dir).state_dict())
    assert remove_lora(model) == names
    assert not lora.lora_modules(model) and set(model.state_dict()) == base_keys
    assert type(model.text.layers[0].attn.q_proj) is nn.Linear
    torch.testing.assert_close(_run(model, inputs["image"]), y, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- peft parity
@pytest.mark.parametrize("kind", ["text", "image"])
def test_peft_adapter_loads(hf_dir, peft_adapter, inputs, kind):
    pm, d = peft_adapter
    model = _ours(hf_dir)
    names = load_adapter(model, d)
    assert len(names) == 2 * 7 + 2 * 4  # text: 7 per layer; vision: qkv + 3 MLP per block
    want = _run(pm, inputs[kind])
    assert (want - _run(tiny_hf_model(seed=0), inputs[kind])).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(_run(model, inputs[kind]), want, **TOL)


def test_disable_adapters_is_base(hf_dir, peft_adapter, inputs):
    base = _ours(hf_dir)
    model = _ours(hf_dir)
    load_adapter(model, peft_adapter[1])
    y = _run(model, inputs["image"])
    with disable_adapters(model):
        off = _run(model, inputs["image"])
    assert torch.equal(off, _run(base, inputs["image"]))  # the DPO reference is exactly the base model
    torch.testing.assert_close(off, _run(tiny_hf_model(seed=0), inputs["image"]), **TOL)
    assert torch.equal(_run(model, inputs["image"]), y)  # flags restored on exit


def test_merged_matches_peft_merge_and_unload(hf_dir, peft_adapter, inputs):
    _, d = peft_adapter
    merged_hf = peft.PeftModel.from_pretrained(tiny_hf_model(seed=0), d).merge_and_unload().eval()
    model = _ours(hf_dir)
    load_adapter(model, d)
    merge_lora(model)
    for kind in ("text", "image"):
        torch.testing.assert_close(_run(model, inputs[kind]), _run(merged_hf, inputs[kind]), **TOL)


@pytest.mark.parametrize("spelling", ["old_prefix", "adapter_name"])
def test_other_key_spellings(hf_dir, peft_adapter, inputs, tmp_path, spelling):
    pm, d = peft_adapter
    if spelling == "old_prefix":  # transformers < 4.52 names
        def rename(k):
            return (k.replace("base_model.model.model.language_model.", "base_model.model.model.")
                    .replace("base_model.model.model.visual.", "base_model.model.visual."))
    else:  # a raw PeftModel state_dict
        def rename(k):
            return k.replace(".weight", ".default.weight")
    d2 = _copy_adapter(d, str(tmp_path / "a"), rename=rename)
    keys = list(load_file(os.path.join(d2, "adapter_model.safetensors")))
    if spelling == "old_prefix":
        assert "base_model.model.visual.blocks.0.attn.qkv.lora_A.weight" in keys
        assert not any("language_model" in k for k in keys)
    else:
        assert all(".default.weight" in k for k in keys)
    model = _ours(hf_dir)
    load_adapter(model, d2)
    torch.testing.assert_close(_run(model, inputs["image"]), _run(pm, inputs["image"]), **TOL)


def test_rslora(hf_dir, inputs, tmp_path):
    pm = _peft_model(targets=["q_proj", "v_proj", "qkv"], use_rslora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    model = _ours(hf_dir)
    load_adapter(model, str(tmp_path))
    assert model.text.layers[0].attn.q_proj.scaling == 8 / 4 ** 0.5
    torch.testing.assert_close(_run(model, inputs["image"]), _run(pm, inputs["image"]), **TOL)


def test_minigmr_adapter_loads_in_peft(hf_dir, inputs, tmp_path):
    model = _ours(hf_dir)
    # text gate_proj but not vision gate_proj, and vision attn.proj but not the Conv3d patch_embed.proj:
    # a plain peft name list could not say this, so the saved target_modules must be exact
    names = inject_lora(model, rank=4, alpha=8, targets=TEXT_TARGETS, vision_targets=("qkv", "proj"), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model)[1::2]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, str(tmp_path), extra_config={"base_model_name_or_path": "tiny"})
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp left
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", 4, 8, "none")
    assert cfg["base_model_name_or_path"] == "tiny"
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    assert keys["base_model.model.model.visual.blocks.1.attn.qkv.lora_B.weight"].shape == (96, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(tiny_hf_model(seed=0), str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    peft_targets = {n for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert len(peft_targets) == len(names)  # exactly the adapted modules, no more
    for kind in ("text", "image"):
        torch.testing.assert_close(_run(pm, inputs[kind]), _run(model, inputs[kind]), **TOL)
    # and back into minigmr
    again = _ours(hf_dir)
    assert sorted(load_adapter(again, str(tmp_path))) == sorted(names)
    assert torch.equal(_run(again, inputs["image"]), _run(model, inputs["image"]))
    with pytest.raises(ValueError, match="may not override"):
        save_adapter(model, str(tmp_path), extra_config={"r": 8})


def test_adapter_on_some_layers_roundtrip(hf_dir, inputs, tmp_path):
    pm = _peft_model(targets=["q_proj", "v_proj"], layers_to_transform=[0])  # text layer 0 only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path / "peft"))
    model = _ours(hf_dir)
    assert load_adapter(model, str(tmp_path / "peft")) == ["text.layers.0.attn.q_proj", "text.layers.0.attn.v_proj"]
    torch.testing.assert_close(_run(model, inputs["text"]), _run(pm, inputs["text"]), **TOL)
    save_adapter(model, str(tmp_path / "ours"))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert "\\d+" not in cfg["target_modules"]  # layer 1 must not be targeted
    again = peft.PeftModel.from_pretrained(tiny_hf_model(seed=0), str(tmp_path / "ours")).eval()
    assert len({n for n, m in again.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}) == 2
    torch.testing.assert_close(_run(again, inputs["text"]), _run(model, inputs["text"]), **TOL)


# ---------------------------------------------------------------------------------------------- bad adapters
Q_A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("case, match", [
    ("extra_key", r"unexpected tensor 'base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_C"),
    ("unknown_module", r"targets 'text.layers.7.attn.q_proj', which this model does not have"),
    ("wrong_shape", r"'base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight' has "
                    r"shape \(4, 63\), expected \(4, 64\)"),
    ("missing_pair", r"module 'text.layers.0.attn.q_proj' has lora_B but not its pair"),
    ("dora", r"unsupported peft LoRA option\(s\) \{'use_dora': True\}"),
    ("rank_pattern", r"unsupported peft LoRA option\(s\) \{'rank_pattern'"),
    ("lora_bias", r"unsupported peft LoRA option\(s\) \{'bias': True\}"),
    ("pissa", r"'init_lora_weights': 'pissa_niter_4'"),
    ("alpha_pattern", r"unsupported peft LoRA option\(s\) \{'alpha_pattern'"),
    ("both_layouts", r"are both lora_A of 'text.layers.0.attn.q_proj'; keep one adapter"),
])
def test_bad_adapter_errors(hf_dir, peft_adapter, tmp_path, case, match):
    _, d = peft_adapter
    kw = {
        "extra_key": dict(extra={Q_A.replace("lora_A", "lora_C"): torch.zeros(4, 64)}),
        "unknown_module": dict(extra={Q_A.replace("layers.0", "layers.7"): torch.zeros(4, 64),  # 2-layer model
                                      Q_A.replace("layers.0.", "layers.7.").replace("lora_A", "lora_B"):
                                          torch.zeros(64, 4)}),
        "wrong_shape": dict(drop=lambda k: k == Q_A, extra={Q_A: torch.zeros(4, 63)}),
        "missing_pair": dict(drop=lambda k: k == Q_A),
        "dora": dict(config={"use_dora": True}),
        "rank_pattern": dict(config={"rank_pattern": {"q_proj": 8}}),
        "lora_bias": dict(config={"bias": "all"}),
        "pissa": dict(config={"init_lora_weights": "pissa_niter_4"}),
        "alpha_pattern": dict(config={"alpha_pattern": {"q_proj": 16}}),  # would silently change the scaling
        "both_layouts": dict(extra={Q_A.replace("model.language_model.", "model."): torch.zeros(4, 64)}),
    }[case]
    d2 = _copy_adapter(d, str(tmp_path / case), **kw)
    model = _ours(hf_dir)
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, d2)
    if case not in ("dora", "rank_pattern", "lora_bias", "pissa", "alpha_pattern"):
        assert os.path.join(d2, "adapter_model.safetensors") in str(err.value)  # names the file
    else:
        assert os.path.join(d2, "adapter_config.json") in str(err.value)
    assert not lora.lora_modules(model)  # nothing changed on failure


def test_peft_conv3d_target_is_refused(hf_dir, tmp_path):
    pm = _peft_model(targets=["proj"])  # also hits the Conv3d visual.patch_embed.proj
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"targets 'vision.patch_embed', which is not an adaptable nn.Linear"):
        load_adapter(_ours(hf_dir), str(tmp_path))


@pytest.mark.parametrize("config, match", [
    ({"lora_alpha": True}, r"numeric 'lora_alpha', got r=4 lora_alpha=True"),
    ({"r": True}, r"positive integer 'r'.*got r=True"),
    ({"use_rslora": "false"}, r"'use_rslora' must be true or false, got 'false'"),
    ({"lora_dropout": 1.5}, r"'lora_dropout' must be a number in \[0, 1\), got 1.5"),
    ({"lora_dropout": -0.5}, r"'lora_dropout' must be a number in \[0, 1\), got -0.5"),
    ({"lora_dropout": "x"}, r"'lora_dropout' must be a number in \[0, 1\), got 'x'"),
    ({"target_modules": 5}, r"'target_modules' must be a string \(a regex\), a list of names or null, got 5"),
])
def test_bad_adapter_config_values(hf_dir, peft_adapter, tmp_path, config, match):
    d = _copy_adapter(peft_adapter[1], str(tmp_path / "a"), config=config)
    model = _ours(hf_dir)
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(model, d)
    assert os.path.join(d, "adapter_config.json") in str(err.value) and not lora.lora_modules(model)


@pytest.mark.parametrize("targets, excluded", [(["nothing"], None), ("nothing", None), (["q_proj"], None),
                                               (PEFT_TARGETS, ["qkv"])])
def test_adapter_tensors_outside_target_modules_are_refused(hf_dir, peft_adapter, tmp_path, targets, excluded):
    """peft injects by target_modules / exclude_modules, so a tensor they leave out would not load in peft."""
    d = _copy_adapter(peft_adapter[1], str(tmp_path / "a"),
                      config={"target_modules": targets, "exclude_modules": excluded})
    model = _ours(hf_dir)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: tensor 'base_model.model.model.*' is for "
                                         r"'model.* which adapter_config.json's target_modules .* leave out"):
        load_adapter(model, d)
    assert not lora.lora_modules(model)


@pytest.mark.parametrize("case, match", [
    ("not_json", r"adapter_config.json: not valid JSON"),
    ("json_list", r"adapter_config.json: expected a JSON object, got list"),
    ("truncated", r"adapter_model.safetensors: not a readable safetensors file"),
    ("empty", r"adapter_model.safetensors: not a readable safetensors file"),
])
def test_unreadable_adapter_files_are_named(hf_dir, peft_adapter, tmp_path, case, match):
    d = _copy_adapter(peft_adapter[1], str(tmp_path / "a"))
    config, tensors = os.path.join(d, "adapter_config.json"), os.path.join(d, "adapter_model.safetensors")
    if case in ("not_json", "json_list"):
        with open(config, "w") as f:
            f.write("{" if case == "not_json" else "[]")
    else:
        with open(tensors, "r+b") as f:
            f.truncate(500 if case == "truncated" else 0)
    with pytest.raises(ValueError, match=match) as err:
        load_adapter(_ours(hf_dir), d)
    assert (config if case in ("not_json", "json_list") else tensors) in str(err.value)


def test_dropout_adapter_loads_in_eval_mode(hf_dir, inputs, tmp_path):
    """An adapter with lora_dropout > 0 loaded into a from_pretrained model (eval mode) scores deterministically,
    as peft's PeftModel.from_pretrained gives eval-mode layers; .train() still turns the dropout on."""
    model = _ours(hf_dir)
    inject_lora(model, rank=4, alpha=8, dropout=0.3, seed=0)
    with torch.no_grad():
        for p in lora_parameters(model)[1::2]:
            p.normal_(0, 0.5)
    save_adapter(model, str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.3
    fresh = Qwen25VL.from_pretrained(hf_dir)  # no .eval(): from_pretrained's own mode
    load_adapter(fresh, str(tmp_path))
    mods = lora.lora_modules(fresh)
    assert mods and not fresh.training and not any(m.training for m in mods.values())
    assert all(isinstance(m.dropout, nn.Dropout) and m.dropout.p == 0.3 for m in mods.values())
    first, second = _run(fresh, inputs["image"]), _run(fresh, inputs["image"])
    assert torch.equal(first, second)
    pm = peft.PeftModel.from_pretrained(tiny_hf_model(seed=0), str(tmp_path))
    torch.testing.assert_close(first, _run(pm, inputs["image"]), **TOL)
    fresh.train()
    assert not torch.equal(_run(fresh, inputs["image"]), first)  # the dropout is there, only off in eval


def test_pickled_adapter_is_refused(hf_dir, peft_adapter, tmp_path):
    d = _copy_adapter(peft_adapter[1], str(tmp_path / "old"))
    os.replace(os.path.join(d, "adapter_model.safetensors"), os.path.join(d, "adapter_model.bin"))  # never read
    model = _ours(hf_dir)
    with pytest.raises(FileNotFoundError, match="only a pickled adapter_model.bin.*convert it to") as err:
        load_adapter(model, d)
    assert d in str(err.value) and not lora.lora_modules(model)
