"""minigmr.synth and minigmr.scenes: determinism, the suite's structure and modalities, hard negatives, training
data, tiny checkpoint.

The checkpoint's layout is checked against transformers (the oracle): it must load there with no missing or
unexpected keys. Worlds are generated small here (8 queries per dataset, 120 training records) to stay fast."""
import hashlib
import json
import os
import random
import re

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

from minigmr import scenes, synth
from minigmr.config import Config
from minigmr.data import load_suite
from minigmr.embedding import EMBEDDER_FILE, Embedder, search
from minigmr.hardware import pinned_threads
from minigmr.train_data import load_training_data
from minigmr.model import Qwen25VL
from minigmr.processor import ImageProcessor, smart_resize

SMALL = dict(n_eval_queries=8, n_candidates=20, n_train=120, pretrain_steps=3, embed_steps=2)  # the machinery only


def file_hashes(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def differing_attributes(a, b):
    return [attr for attr in scenes.ATTRIBUTES if getattr(a, attr) != getattr(b, attr)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synth.generate_world(str(tmp_path_factory.mktemp("w") / "seed0"), seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_other_bytes(world, tmp_path):
    again = synth.generate_world(str(tmp_path / "again"), seed=0, **SMALL)
    a, b = file_hashes(world["root"]), file_hashes(again["root"])
    assert any(k.endswith(".png") for k in a)
    assert "checkpoint/tokenizer.json" in a and "checkpoint/model.safetensors" in a
    assert a == b
    other = file_hashes(synth.generate_world(str(tmp_path / "other"), seed=1, **SMALL)["root"])
    for name in ["checkpoint/model.safetensors", "train/train.jsonl"] + [
            f"suite/{d}/{f}" for d in synth.TASKS for f in ("corpus.jsonl", "qrels.tsv", "run.trec")]:
        assert a[name] != other[name], name
    assert set(k for k in a if k.endswith(".png")).isdisjoint(k for k in other if k.endswith(".png"))


def modality(item):
    return {(True, False): "T", (False, True): "I", (True, True): "IT"}[(item.text is not None, item.image is not None)]


def test_suite_structure_and_modalities(world):
    datasets = load_suite(world["suite"])
    assert sorted(d.task for d in datasets) == sorted(["T->T", "I->I", "T->I", "T->VD", "I->T", "T->IT", "IT->T",
                                                       "IT->I", "IT->IT"])
    for ds in datasets:
        # the modalities follow from the MRB task name alone (a visual document is an image)
        want_q, want_d = (m.replace("VD", "I") for m in ds.task.split("->"))
        assert {modality(q) for q in ds.queries.values()} == {want_q}, ds.name
        assert {modality(d) for d in ds.corpus.values()} == {want_d}, ds.name
        assert ds.main_metric == "ndcg@10" and ds.source == "minigmr.synth seed=0" and ds.instruction
        assert len(ds.queries) == SMALL["n_eval_queries"]
        for qid in ds.queries:
            rels = ds.qrels[qid]
            assert set(rels) <= set(ds.corpus) and any(r >= 1 for r in rels.values()), (ds.name, qid)
            assert set(rels.values()) <= {1, 2}
            assert len(ds.run[qid]) == SMALL["n_candidates"] and set(ds.run[qid]) <= set(ds.corpus)
        for item in list(ds.queries.values()) + list(ds.corpus.values()):
            assert item.image is None or os.path.isfile(item.image)


def test_first_stage_is_the_worlds_embedder(world, tmp_path):
    """Each run.trec is the saved embedder's top n_candidates (embedding.search), the attribute formula's run is
    kept beside it, and the training records carry the description the embedder's next-token term reads."""
    embedder = Embedder.from_pretrained(world["embedder"], dtype=torch.float32)  # the world is written in fp32
    assert os.path.isfile(os.path.join(world["embedder"], EMBEDDER_FILE))
    for ds in load_suite(world["suite"]):
        ids = list(ds.corpus)
        with pinned_threads(1):  # as generate_world embeds: the same float sums, so the same scores to the bit
            corpus = embedder.embed([ds.corpus[d].as_input() for d in ids])
            queries = embedder.embed([q.as_input() for q in ds.queries.values()], ds.instruction)
        assert ds.run == dict(zip(ds.queries, search(queries, corpus, ids, SMALL["n_candidates"])))
        assert os.path.isfile(os.path.join(ds.root, "run.attributes.trec"))
    records = load_training_data(world["train"])
    assert all(r.description and r.description.startswith(("note", "record", "entry")) for r in records)
    manifest = json.load(open(os.path.join(world["root"], "world.json")))
    assert manifest["first_stage"] == "embedder" and manifest["embed_steps"] == SMALL["embed_steps"]
    ablation = synth.generate_world(str(tmp_path / "a"), first_stage="attributes",
                                    **{**SMALL, "embed_steps": 0, "pretrain_steps": 0})
    assert not os.path.exists(ablation["embedder"])
    assert not os.path.exists(os.path.join(ablation["suite"], "synth_t2t", "run.attributes.trec"))
    with pytest.raises(ValueError, match="first_stage"):
        synth.generate_world(str(tmp_path / "b"), first_stage="bm25")


def test_base_world_then_first_stage_equals_the_whole_world(world, tmp_path):
    """demo.sh's two steps (--stage base, then all) write the one-shot world's files byte for byte; the base world
    already serves training (checkpoint, train.jsonl) and has no first stage yet; an interrupted completion (the
    run.trec files replaced, world.json not yet) runs again to the same bytes."""
    out = str(tmp_path / "w")
    base = synth.ensure_world(out, 0, stage="base", **SMALL)
    manifest = json.load(open(os.path.join(out, "world.json")))
    assert manifest["first_stage"] is None and "embed_steps" not in manifest
    assert os.path.isfile(os.path.join(base["checkpoint"], "model.safetensors")) and os.path.isfile(base["train"])
    assert not os.path.exists(base["embedder"])
    assert not os.path.exists(os.path.join(base["suite"], "synth_t2t", "run.attributes.trec"))
    assert synth.ensure_world(out, 0, stage="base", **SMALL) == base  # a base world is what --stage base asks
    with pytest.raises(ValueError, match="other settings"):  # the base's own settings are still checked
        synth.ensure_world(out, 0, **{**SMALL, "n_train": 121})
    synth.ensure_world(out, 0, **SMALL)  # stage="all": completes it in place
    assert file_hashes(out) == file_hashes(world["root"])
    with open(os.path.join(out, "world.json"), "w") as f:  # as if stopped before world.json was rewritten
        json.dump(manifest, f, indent=2)
    synth.complete_world(out, embed_steps=SMALL["embed_steps"])
    assert file_hashes(out) == file_hashes(world["root"])
    with pytest.raises(ValueError, match="already has: embedder"):
        synth.complete_world(out)
    with pytest.raises(ValueError, match="stage"):
        synth.generate_world(str(tmp_path / "b"), stage="half")


def test_qrels_hard_negatives_and_run_follow_the_attributes(tmp_path):
    datasets = synth.write_eval_suite(str(tmp_path), seed=3, n_queries=12, n_candidates=30)
    loaded = {d.name: d for d in load_suite(str(tmp_path))}
    at_top, near_in_top10, found = [], [], []
    for name, ds in datasets.items():
        docs = {d["id"]: d["groups"] for d in ds["docs"]}
        for q in ds["queries"]:
            target = q["groups"][0]
            # relevance recomputed from the attribute records: 2 = exactly the target, 1 = target plus another group
            want = {d: 2 if g == [target] else 1 for d, g in docs.items() if target in g}
            assert loaded[name].qrels[q["id"]] == want
            # every query has >= 8 single-attribute hard negatives in the corpus, over all four attributes
            hard = [g[0] for g in docs.values() if len(g) == 1 and len(differing_attributes(g[0], target)) == 1]
            assert len(hard) >= 8 and {differing_attributes(g, target)[0] for g in hard} == set(scenes.ATTRIBUTES)
            if "ref" in q:  # IT->I: the reference image is one edit away from the target
                assert differing_attributes(q["ref"][0], target) == [q["edit"]]
            ranked = loaded[name].candidates(q["id"])
            at_top.append(docs[ranked[0]] == [target])
            found.append(any(docs[d] == [target] for d in ranked))
            near_in_top10.append(any(len(docs[d]) == 1 and len(differing_attributes(docs[d][0], target)) == 1
                                     for d in ranked[:10]))
    # a realistic first stage: positive usually retrieved, often not first, hard negatives near the top
    assert sum(found) / len(found) > 0.8 and sum(at_top) / len(at_top) < 0.7 and sum(near_in_top10) / len(found) > 0.8


def test_make_example_hard_negatives_change_exactly_one_attribute():
    rng = random.Random(0)
    for qkind in ("question", "image+edit"):
        for target in rng.sample(scenes.ALL_GROUPS, 50):
            ex = synth.make_example(qkind, target, rng, n_hard=8, p_partial=1.0)
            hard = [g[0] for g in ex["hard"]]
            assert len(hard) == len(set(hard)) == 8
            assert all(len(differing_attributes(g, target)) == 1 for g in hard)
            assert ex["positives"][0] == [target]
            if target.position in scenes.OPPOSITE:  # the partial doc: target + a group of another colour and shape
                extra = ex["positives"][1][1]
                assert ex["positives"][1][0] == target
                assert {"colour", "shape"} <= set(differing_attributes(extra, target))


def test_training_data(world):
    records = load_training_data(world["train"])
    assert len(records) == SMALL["n_train"]
    assert len({r.instruction for r in records}) == len(synth.TASKS)  # all nine task types mixed
    assert all(len(r.hard_negatives) >= 4 and r.negatives and r.positives for r in records)
    assert any(r.query.image and r.query.text for r in records) and any(r.query.image is None for r in records)


def test_training_records_attributes_and_disjointness(tmp_path):
    suite = synth.write_eval_suite(str(tmp_path / "suite"), seed=0, n_queries=8, n_candidates=20)
    eval_targets = {q["groups"][0] for ds in suite.values() for q in ds["queries"]}
    records = synth.write_training_data(str(tmp_path / "train"), seed=0, n_records=90, exclude=eval_targets)
    lines = [json.loads(line) for line in open(tmp_path / "train" / "train.jsonl")]
    for rec, line in zip(records, lines):
        target = rec["query"]["groups"][0]
        assert target not in eval_targets
        assert rec["positives"] == [[target]]
        assert all(len(differing_attributes(g[0], target)) == 1 for g in rec["hard"])
        assert all(len(differing_attributes(g[0], target)) >= 2 for g in rec["negatives"])
        if isinstance(line["positives"][0], str):  # text documents spell out every attribute of the target
            assert scenes.describe([target]) in line["positives"][0]


def test_tiny_checkpoint(world):
    ckpt = world["checkpoint"]
    config = Config.from_json(ckpt)
    tok = Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    for word in ("yes", "no"):
        assert len(tok.encode(word, add_special_tokens=False).ids) == 1
    t = config.text
    assert (t.image_token_id, t.video_token_id, t.vision_start_token_id, t.vision_end_token_id) == tuple(
        tok.token_to_id(s) for s in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == tuple(
        tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_end|>", "<|endoftext|>"))
    assert t.vocab_size % 64 == 0 and tok.get_vocab_size() <= t.vocab_size < tok.get_vocab_size() + 64
    model = Qwen25VL.from_pretrained(ckpt)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    # every synthetic image passes the processor unchanged in size (multiples of 28, within min/max pixels)
    proc = ImageProcessor.from_pretrained(ckpt)
    for ds in load_suite(world["suite"]):
        for item in list(ds.corpus.values())[:5]:
            if item.image:
                _, (_, gh, gw) = proc.preprocess(item.image)
                w, h = Image.open(item.image).size
                assert (gh * 14, gw * 14) == smart_resize(h, w, 28, proc.min_pixels, proc.max_pixels)
                assert gh * gw // 4 <= 64


def test_tiny_checkpoint_loads_in_transformers(world):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(world["checkpoint"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = Qwen25VL.from_pretrained(world["checkpoint"])
    torch.testing.assert_close(hf.get_input_embeddings().weight, ours.text.embed_tokens.weight, rtol=0, atol=0)
    assert json.load(open(os.path.join(world["root"], "world.json")))["pretraining"]["steps"] == 3


def test_tiny_checkpoint_init(tmp_path):
    synth.write_tiny_checkpoint(str(tmp_path), pretrain_steps=0)
    ours = Qwen25VL.from_pretrained(str(tmp_path))
    for w in (ours.text.embed_tokens.weight, ours.text.layers[0].mlp.down_proj.weight, ours.vision.merger.fc2.weight):
        assert abs(w.std().item() / synth.INIT_STD - 1) < 0.05  # every matrix re-initialised at INIT_STD


def test_ensure_world_and_cli(world, tmp_path):
    out = str(tmp_path / "w")
    synth.main(["--out", out, "--seed", "0", "--eval-queries", str(SMALL["n_eval_queries"]),
                "--candidates", str(SMALL["n_candidates"]), "--train", str(SMALL["n_train"]),
                "--pretrain-steps", str(SMALL["pretrain_steps"]), "--embed-steps", str(SMALL["embed_steps"])])
    assert file_hashes(out) == file_hashes(world["root"])  # the CLI writes exactly what generate_world writes
    assert [p for p in os.listdir(tmp_path) if "tmp" in p] == []  # the temporary folder was renamed away
    mtime = os.path.getmtime(os.path.join(out, "world.json"))
    assert synth.ensure_world(out, seed=0, **SMALL)["suite"] == os.path.join(out, "suite")
    assert os.path.getmtime(os.path.join(out, "world.json")) == mtime  # present: not generated again
    with pytest.raises(ValueError, match="other settings"):
        synth.ensure_world(out, seed=1)
    manifest = json.load(open(os.path.join(out, "world.json")))
    assert manifest["version"] == synth.WORLD_VERSION
    with open(os.path.join(out, "world.json"), "w") as f:  # a world written by an older minigmr is not reused
        json.dump({**manifest, "version": synth.WORLD_VERSION - 1}, f)
    old, new = synth.WORLD_VERSION - 1, synth.WORLD_VERSION
    with pytest.raises(ValueError, match=rf"'version': \({old}, {new}\).*delete the folder"):
        synth.ensure_world(out, seed=0, **SMALL)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a minigmr synthetic world"):
        synth.ensure_world(str(foreign))


@pytest.mark.parametrize("flags, match", [
    (["--candidates", "0"], r"n_candidates \(--candidates\) must be an integer in 1\.\.12, got 0"),
    (["--candidates", "-3"], r"n_candidates \(--candidates\) must be an integer in 1\.\.12, got -3"),
    (["--candidates", "13"], r"in 1\.\.12, got 13 \(the smallest corpus at this many eval queries\)"),
    (["--train", "0"], r"n_train \(--train\) must be an integer in 1\.\.any, got 0"),
    (["--eval-queries", "0"], r"n_queries \(--eval-queries\) must be an integer in 1\.\.240, got 0"),
    (["--eval-queries", "10000"], r"n_queries \(--eval-queries\) must be an integer in 1\.\.240, got 10000"),
])
def test_cli_sizes_checked_before_any_work(tmp_path, capsys, flags, match):
    base = {"--eval-queries": "1", "--candidates": "5", "--train": "5"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "w"), "--pretrain-steps", "0", *sum(map(list, base.items()), [])])
    assert re.search(match, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []  # nothing written, no temporary folder


def test_api_sizes_checked(tmp_path):
    with pytest.raises(ValueError, match=r"n_candidates \(--candidates\) must be an integer in 1\.\.12, got -3"):
        synth.write_eval_dataset(str(tmp_path / "d"), "synth_t2t", n_queries=1, n_candidates=-3)
    with pytest.raises(ValueError, match=r"n_records \(--train\) must be a positive integer, got 0"):
        synth.write_training_data(str(tmp_path / "t"), n_records=0)
    with pytest.raises(ValueError, match=r"every group is an eval query target"):
        synth.write_training_data(str(tmp_path / "t"), n_records=1, exclude=scenes.ALL_GROUPS)
    assert os.listdir(tmp_path) == []


def test_world_json_not_an_object(tmp_path):
    (tmp_path / "world.json").write_text("[]")
    with pytest.raises(ValueError, match=r"world.json: expected a JSON object"):
        synth.ensure_world(str(tmp_path))
