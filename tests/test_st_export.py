"""The sentence-transformers export: `CrossEncoder(folder)` renders minigmr's GMR prompt exactly and returns its
log-odds (the logit of p(yes)), its p(yes) and its ranking, on text and image documents, with and without an
adapter; and the export fails loudly, leaving nothing behind."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import tiny_hf_model
from oracles import (QWEN25VL_CHAT_TEMPLATE, make_tiny_tokenizer_dir, real_qwen_tokenizer_json,
                     write_preprocessor_config)
from PIL import Image
from sentence_transformers import CrossEncoder
from transformers import AutoProcessor

from minigmr.lora import inject_lora
from minigmr.model import Qwen25VL
from minigmr.peft_io import save_adapter
from minigmr.processor import Processor
from minigmr.prompt import DEFAULT_INSTRUCTION, gmr_messages
from minigmr.scoring import Reranker
from minigmr import st_export
from minigmr.st_export import write_sentence_transformers_files

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from export_st import export  # noqa: E402
from export_st import main as export_main  # noqa: E402

MIN_PIX, MAX_PIX = 28 * 28 * 4, 28 * 28 * 40
INSTRUCTION = "Find the document that shows the query."


def img(seed, w, h):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved by transformers, its head scaled so that log-odds spread over several units
    (random heads give near-ties, and a ranking test on near-ties tests nothing)."""
    path = str(tmp_path_factory.mktemp("ckpt"))
    model = tiny_hf_model(seed=3, tie=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(60)
    model.save_pretrained(path)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path, MIN_PIX, MAX_PIX)
    return path


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    return export(ckpt, str(tmp_path_factory.mktemp("st") / "model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    img(0, 56, 84).save(d / "a.png")
    img(1, 112, 56).save(d / "b.png")
    text_docs = ["a red circle on the left", "two blue squares?", "the answer is 42.", "x", "a long passage " * 9]
    image_docs = [{"image": str(d / "a.png")}, {"text": "a caption", "image": str(d / "b.png")}, img(2, 90, 70),
                  {"image": img(3, 60, 60), "text": "red"}, "a text document among images"]
    queries = ["which shape is red?", {"image": img(7, 70, 98)}, {"image": img(8, 84, 56), "text": "what is this?"}]
    return queries, text_docs, image_docs


def test_chat_template_renders_the_gmr_prompt(exported, data):
    proc, ours = AutoProcessor.from_pretrained(exported), Processor.from_pretrained(exported)
    queries, text_docs, image_docs = data
    as_content = lambda x: ([{"type": "image", "image": x["image"]}] if "image" in x else []) + \
        ([{"type": "text", "text": x["text"]}] if "text" in x else [])  # sentence-transformers' structured messages
    for q in queries:
        for d in text_docs[:2] + image_docs[:2]:
            qd, dd = ({"text": x} if isinstance(x, str) else x for x in (q, d))
            pair = [{"role": "query", "content": as_content(qd)}, {"role": "document", "content": as_content(dd)}]
            for instruction, system in ((None, []), (INSTRUCTION, [{"role": "system", "content": INSTRUCTION}])):
                got = proc.apply_chat_template(system + pair, tokenize=False)
                assert got == ours.render(gmr_messages(instruction or DEFAULT_INSTRUCTION, q, d))
    chat = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]  # any other chat: the official template
    assert proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ours.render(chat)


def log_odds(rr, query, docs, instruction=None):
    z = rr.logits(query, docs, instruction=instruction)
    return z[:, 0] - z[:, 1]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_cross_encoder_equals_minigmr(exported, data, kind):
    queries, text_docs, image_docs = data
    docs = text_docs if kind == "text" else image_docs
    rr, ce = Reranker.from_pretrained(exported, dtype=torch.float32), CrossEncoder(exported, device="cpu")
    for q in queries:
        for instruction in (None, INSTRUCTION):
            kw = {} if instruction is None else {"prompt": instruction}
            pairs = [(q, d) for d in docs]
            ref = log_odds(rr, q, docs, instruction)
            assert ref.max() - ref.min() > 0.5  # spread: a ranking test, not a tie-break test
            got = ce.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True, **kw)
            torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=0)
            np.testing.assert_allclose(ce.predict(pairs, **kw), rr.score(q, docs, instruction), atol=1e-5, rtol=0)
            assert [r["corpus_id"] for r in ce.rank(q, docs, **kw)] == [i for i, _ in rr.rank(q, docs, instruction)]


def test_adapter_and_yes_logit_score(ckpt, data, tmp_path):
    """A LoRA adapter merged by the export scores as minigmr's on-the-fly merge; score "cl" gives z_yes."""
    model = Qwen25VL.from_pretrained(ckpt)
    inject_lora(model, rank=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):  # B = 0 would make the adapter a no-op
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    save_adapter(model, str(tmp_path / "adapter"))
    out = export(ckpt, str(tmp_path / "cl"), adapter=str(tmp_path / "adapter"), score="cl")
    rr = Reranker.from_pretrained(ckpt, adapter=str(tmp_path / "adapter"), score_type="cl", dtype=torch.float32)
    queries, text_docs, image_docs = data
    z = rr.logits(queries[2], image_docs)
    ce = CrossEncoder(out, device="cpu")
    got = ce.predict([(queries[2], d) for d in image_docs], convert_to_tensor=True)  # activation: Identity
    torch.testing.assert_close(got.float(), z[:, 0], atol=1e-4, rtol=0)
    assert Reranker.from_pretrained(out).score_type == "cl"


def test_export_errors_leave_nothing(ckpt, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export(ckpt, str(tmp_path / "taken"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        export(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="taken: no config.json"):
        write_sentence_transformers_files(str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="score must be 'sft' or 'cl'"):  # fails after the weights are written
        export(ckpt, str(tmp_path / "out"), score="pairwise")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    export_main([ckpt, str(tmp_path / "cli"), "--score", "cl", "--dtype", "bfloat16"])  # the command line
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert Reranker.from_pretrained(str(tmp_path / "cli")).score_type == "cl"


def test_real_vocabulary_and_a_checkpoint_with_its_own_templates(ckpt, tmp_path):
    """A folder laid out like the official checkpoints (real Qwen tokenizer, chat_template.json, a tokenizer_config
    with its own template): the export resolves yes = 9693 / no = 2152, removes the legacy template that transformers
    would prefer, and transformers' processor then gives minigmr's token ids, pixels and grids for a pair."""
    folder = tmp_path / "official"
    folder.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_bytes((Path(ckpt) / name).read_bytes())
    real_qwen_tokenizer_json(str(folder))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": QWEN25VL_CHAT_TEMPLATE}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN25VL_CHAT_TEMPLATE, "extra_special_tokens": {},
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "processor_class": "Qwen2_5_VLProcessor"}))
    write_sentence_transformers_files(str(folder))
    assert not (folder / "chat_template.json").exists()
    head = json.loads((folder / "1_LogitScore" / "config.json").read_text())
    assert (head["true_token_id"], head["false_token_id"]) == (9693, 2152)
    proc, ours = AutoProcessor.from_pretrained(str(folder)), Processor.from_pretrained(str(folder))
    query, doc = {"text": "what is red?", "image": img(5, 70, 98)}, {"image": img(6, 112, 56), "text": "a caption"}
    content = lambda x: [{"type": "image", "image": x["image"]}, {"type": "text", "text": x["text"]}]
    got = proc.apply_chat_template([[{"role": "system", "content": INSTRUCTION},
                                     {"role": "query", "content": content(query)},
                                     {"role": "document", "content": content(doc)}]],
                                   tokenize=True, return_dict=True, return_tensors="pt")
    want = ours.apply_chat([gmr_messages(INSTRUCTION, query, doc)])
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["image_grid_thw"].tolist() == want["image_grid_thw"].tolist()
    torch.testing.assert_close(got["pixel_values"].float(), want["pixel_values"], atol=1e-6, rtol=0)


def test_exported_fallback_template_is_the_official_one():
    """Conversations that are not a (query, document) pair fall back to Qwen2.5-VL's own chat template, verbatim."""
    assert st_export.QWEN25VL_TEMPLATE == QWEN25VL_CHAT_TEMPLATE
