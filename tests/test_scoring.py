"""The fused scorer equals the plain full-sequence forward, whatever the batch size, padding side and candidate order;
and the plain forward itself equals transformers."""
import random

import numpy as np
import pytest
import torch
from hf_reference import IMAGE_PAD, save_tiny_hf
from oracles import make_hf_processor, make_tiny_tokenizer_dir, write_preprocessor_config
from PIL import Image

from minigmr.model import Qwen25VL
from minigmr.processor import Processor
from minigmr.prompt import gmr_messages
from minigmr.scoring import Reranker, reference_logits

MIN_PIX, MAX_PIX = 28 * 28 * 4, 28 * 28 * 40


def img(seed, w, h, mode="RGB"):
    a = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(a).convert(mode)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_hf(path, seed=3, tie=True, vision_depth=2, fullatt=(1,), text_layers=3)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path, MIN_PIX, MAX_PIX)
    return str(path)


@pytest.fixture(scope="module")
def model_proc(ckpt):
    return Qwen25VL.from_pretrained(ckpt), Processor.from_pretrained(ckpt)


def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, (w, h) in enumerate([(56, 84), (112, 56), (90, 70)]):
        p = d / f"im{i}.png"
        img(i, w, h).save(p)
        paths.append(p)
    docs = ["a red circle on the left", "two blue squares?", "the answer is 42.", "x",
            {"image": str(paths[0])}, {"image": paths[1], "text": "a caption under the picture"}, paths[2],
            {"image": str(paths[0]), "text": "same image as document 4, other text"}, img(9, 60, 60, "RGBA"),
            "a much longer passage " * 12]
    queries = ["which shape is red?", "find the picture with two squares ", {"image": img(7, 70, 98)},
               {"image": img(8, 84, 56), "text": "what is shown here?\n"}]
    return queries, docs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return cases(tmp_path_factory)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_equals_plain(model_proc, data, batch_size, side):
    model, proc = model_proc
    queries, docs = data
    rr = Reranker(model, proc, batch_size=batch_size, padding_side=side)
    for q in queries:
        ref = reference_logits(model, proc, q, docs, instruction="Find the matching document.")
        got = rr.logits(q, docs, instruction="Find the matching document.")
        assert got.dtype == torch.float32 and got.shape == (len(docs), 2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_candidate_order_and_single_document(model_proc, data):
    model, proc = model_proc
    queries, docs = data
    rr = Reranker(model, proc, batch_size=4)
    perm = list(range(len(docs)))
    random.Random(0).shuffle(perm)
    for q in queries:
        base = rr.logits(q, docs)
        shuffled = rr.logits(q, [docs[i] for i in perm])
        torch.testing.assert_close(shuffled, base[perm], atol=1e-5, rtol=0)
        one = rr.logits(q, [docs[3]])  # a single candidate: nothing is shared but the prefix still works
        torch.testing.assert_close(one[0], base[3], atol=1e-5, rtol=0)


def test_reference_path_equals_transformers(ckpt, model_proc, data):
    """The plain path (our processor + our model) equals transformers' processor + model on the GMR prompt."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    model, proc = model_proc
    queries, docs = data
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf_proc = make_hf_processor(ckpt, MIN_PIX, MAX_PIX)
    yes, no = proc.token_id("yes"), proc.token_id("no")
    q = queries[3]
    docs = [d for d in docs if not (isinstance(d, dict) and isinstance(d.get("image"), str))][:6]
    convs = [gmr_messages("Find it.", q, d) for d in docs]
    texts = [hf_proc.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
    images = [it["image"] if not isinstance(it["image"], str) else Image.open(it["image"])
              for c in convs for m in c if isinstance(m["content"], list) for it in m["content"] if it["type"] == "image"]
    images = [Image.open(i) if hasattr(i, "__fspath__") else i for i in images]
    enc = hf_proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = hf(**{k: v for k, v in enc.items()}, use_cache=False).logits[:, -1, [yes, no]]
    assert "mm_token_type_ids" in enc and bool((enc["mm_token_type_ids"] == (enc["input_ids"] == IMAGE_PAD)).all())
    torch.testing.assert_close(reference_logits(model, proc, q, docs, instruction="Find it."), out, atol=1e-4, rtol=0)
    torch.testing.assert_close(Reranker(model, proc).logits(q, docs, instruction="Find it."), out, atol=1e-4, rtol=0)


def test_score_rank_and_errors(ckpt, data):
    rr = Reranker.from_pretrained(ckpt, batch_size=2)
    queries, docs = data
    logits = rr.logits(queries[0], docs)
    scores = rr.score(queries[0], docs)
    expected = torch.softmax(logits, -1)[:, 0]
    assert all(0.0 <= s <= 1.0 for s in scores)
    torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-7, rtol=0)
    ranked = rr.rank(queries[0], docs, top_k=3)
    assert len(ranked) == 3 and [s for _, s in ranked] == sorted(scores, reverse=True)[:3]
    assert all(scores[i] == s for i, s in ranked)
    with pytest.raises(ValueError, match="non-empty list"):
        rr.score("q", [])
    with pytest.raises(ValueError, match="cannot open image file.*nope.png"):
        rr.score("q", [{"image": "/nope.png"}])
    with pytest.raises(ValueError, match=r"^document 1: image \(/nope1.png\)"):  # images run in parallel: the first
        rr.score("q", ["a", {"image": "/nope1.png"}, "b", {"image": "/nope3.png"}])
    with pytest.raises(ValueError, match="document 0: prompt has"):
        Reranker(rr.model, rr.processor, max_length=10).score("q", ["d"])
    with pytest.raises(TypeError, match="must be a str"):
        rr.score("q", [3.5])


def test_cl_score_is_the_yes_logit_and_checkpoints_can_ask_for_it(ckpt, data, tmp_path):
    import json
    import shutil
    queries, docs = data
    logits = Reranker.from_pretrained(ckpt).logits(queries[0], docs)
    cl = Reranker.from_pretrained(ckpt, score_type="cl")
    assert cl.score_type == "cl"
    torch.testing.assert_close(torch.tensor(cl.score(queries[0], docs)), logits[:, 0], atol=1e-6, rtol=0)
    assert [i for i, _ in cl.rank(queries[0], docs)] == logits[:, 0].argsort(descending=True, stable=True).tolist()
    # a checkpoint folder with minigmr_reranker.json (train.py writes it) is read with the score it names
    marked = tmp_path / "marked"
    shutil.copytree(ckpt, marked)
    (marked / "minigmr_reranker.json").write_text(json.dumps({"score": "cl"}))
    assert Reranker.from_pretrained(str(marked)).score_type == "cl"
    assert Reranker.from_pretrained(str(marked), score_type="sft").score_type == "sft"  # an explicit choice wins
    (marked / "minigmr_reranker.json").write_text(json.dumps({"score": "logit"}))
    with pytest.raises(ValueError, match="minigmr_reranker.json: 'score' must be 'sft' or 'cl'"):
        Reranker.from_pretrained(str(marked))
    (marked / "minigmr_reranker.json").write_text('{"score": "cl"')  # truncated file
    with pytest.raises(ValueError, match="minigmr_reranker.json: not valid JSON"):
        Reranker.from_pretrained(str(marked))
    with pytest.raises(ValueError, match="score_type must be 'sft'"):
        Reranker(cl.model, cl.processor, score_type="z")


def test_group_logits_equals_plain_and_has_gradients(model_proc, data):
    """The training path (many queries, all documents in one batch, autograd) equals the plain forward."""
    from minigmr.scoring import group_logits
    model, proc = model_proc
    queries, docs = data
    groups = [("Find it.", queries[0], docs[:4]), ("Match the picture.", queries[3], docs[4:9]),
              ("Find it.", queries[2], [docs[9], docs[0]])]
    out, lengths = group_logits(model, proc, groups, return_lengths=True)
    ref = torch.cat([reference_logits(model, proc, q, d, instruction=i) for i, q, d in groups])
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)
    full = [proc.apply_chat([gmr_messages(i, q, d)])["input_ids"].shape[1] for i, q, ds in groups for d in ds]
    assert lengths == full  # the lengths of the whole prompts, group-major
    with pytest.raises(ValueError, match=f"group 1 document 0: prompt has {full[4]} tokens > max_length=") as err:
        group_logits(model, proc, groups, max_length=max(full[:4]))  # group 1 (images) has the longest prompts
    assert (err.value.group, err.value.document, err.value.length) == (1, 0, full[4])
    out[:, 0].sum().backward()
    assert model.vision.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # images of queries and documents
    assert model.text.layers[0].attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
