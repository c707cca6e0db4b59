"""minigmr.pretrain: the caption-pretraining batches say what they should, never teach "yes"/"no", and a few
hundred steps really ground the tiny model (the colour word of held-out pictures, from chance to most of the time)."""
import random

import pytest

from minigmr import pretrain, scenes, synth
from minigmr.model import Qwen25VL
from minigmr.processor import Processor


@pytest.fixture(scope="module")
def random_init(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ckpt"))
    synth.write_tiny_checkpoint(folder, pretrain_steps=0)
    return folder


def test_labels_are_exactly_the_answer(random_init):
    proc = Processor.from_pretrained(random_init)
    rng = random.Random(0)
    examples = [pretrain.caption_example(rng, p_page=0.5) for _ in range(64)]
    assert {len(g) for _, _, g in examples} == {1, 2} and any(t.startswith(("note", "record", "entry"))
                                                                for _, t, _ in examples)
    batch, labels = pretrain.caption_batch(proc, examples)
    assert labels.shape == (len(examples), batch["input_ids"].shape[1] - 1)
    for b, (_, text, groups) in enumerate(examples):
        ids = labels[b][labels[b] != -100].tolist()
        assert proc.tokenizer.decode(ids, skip_special_tokens=False) == text + "<|im_end|>"
        if text == scenes.describe(groups) and len(groups) == 1:  # one token per word: ATTRIBUTE_TOKENS holds
            words = text.split()
            for attr, idx in pretrain.ATTRIBUTE_TOKENS.items():
                assert " ".join(words[i] for i in idx) in (scenes.COUNTS[groups[0].count], groups[0].colour,
                                                          groups[0].shape, scenes.SHAPES[groups[0].shape],
                                                          scenes.POSITIONS[groups[0].position][0])
    # the reranker's answer words are never a pretraining target
    yes_no = {proc.token_id("yes"), proc.token_id("no")}
    assert yes_no.isdisjoint(labels[labels != -100].tolist())


def test_pretraining_grounds_the_tiny_model(random_init):
    model = Qwen25VL.from_pretrained(random_init)
    proc = Processor.from_pretrained(random_init)
    before = pretrain.caption_accuracy(model, proc, n=64)
    assert before["colour"] < 0.4  # chance is 1/6
    losses = pretrain.pretrain(model, proc, steps=300, p_page=0.0, progress=False)
    after = pretrain.caption_accuracy(model, proc, n=64)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.4 * first, (first, last)
    # colour is learned first (chance 1/6); count, shape and position need the full PRETRAIN_STEPS
    assert after["colour"] >= 0.5, after
    assert not model.training  # pretrain leaves the model in eval mode


def test_bad_settings_are_errors(random_init, tmp_path):
    model, proc = Qwen25VL.from_pretrained(random_init), Processor.from_pretrained(random_init)
    with pytest.raises(ValueError, match="steps >= 1"):
        pretrain.pretrain(model, proc, steps=-5, progress=False)
    with pytest.raises(SystemExit):
        synth.main(["--out", str(tmp_path / "w"), "--pretrain-steps", "-1"])
    assert not (tmp_path / "w").exists()
