"""PIVOT in miniature at toy size (minigmr/probes.py, pivot.py), CPU, fp32.

  - the linear probe recovers a label from features that encode it, and is at chance on shuffled labels
  - tower_features puts the ViT's patch features back in raster order: merging them gives the tower's output
  - the transplant has the arm's vision tower, bit for bit, and a fresh seeded merger; train.py --train
    lora+projector leaves that tower bit-identical
  - pivot.py runs end to end (a couple of steps, one seed) and writes its table, figure and JSON
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import pivot
from minigmr.model import Qwen25VL
from minigmr.probes import fresh_merger, linear_probe, probe_pictures, to_grid, tower_features, write_transplant
from minigmr.processor import ImageProcessor
from minigmr.synth import generate_world
from minigmr.vision import rotary_position_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp("world")), n_eval_queries=2, n_candidates=10, n_train=24,
                          pretrain_steps=0, first_stage="attributes")  # the machinery: random init is enough


def test_linear_probe_recovers_a_label_and_is_at_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    k, n_train, n_test, d = 5, 500, 2000, 16
    y = torch.randint(0, k, (n_train + n_test,), generator=g)
    x = torch.randn(n_train + n_test, d, generator=g)
    x[:, :k] += 6 * torch.nn.functional.one_hot(y, k)  # each class 6 noise sds out along its own axis
    pred = linear_probe(x[:n_train], y[:n_train], x[n_train:], k, seed=0)
    # the Bayes rule errs when one of 4 other N(0,1) coordinates beats N(6,1), P(N(0,1) > 6/sqrt 2) each: < 1e-4
    assert (pred == y[n_train:]).float().mean() > 0.99
    # shuffled labels (train and held-out alike) carry nothing of x: held-out accuracy is chance, 1/k, with
    # binomial noise over the held-out pictures
    shuffled = y[torch.randperm(n_train + n_test, generator=g)]
    pred = linear_probe(x[:n_train], shuffled[:n_train], x[n_train:], k, seed=0)
    acc = (pred == shuffled[n_train:]).float().mean().item()
    assert abs(acc - 1 / k) < 4 * (1 / k * (1 - 1 / k) / n_test) ** 0.5  # within 4 standard errors of chance


def test_to_grid_puts_every_patch_at_its_row_and_column():
    gh, gw = 6, 8
    pos = rotary_position_ids(torch.tensor([[1, gh, gw]]), 2)  # (N, 2) (row, col) of each patch, processor order
    grid = to_grid(pos.reshape(-1, 4, 2), gh, gw, 2)  # (gh, gw, 2)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    assert torch.equal(grid, torch.stack([rows, cols], -1))


def test_patch_features_come_back_in_raster_order(world):
    vision = Qwen25VL.from_pretrained(world["checkpoint"]).vision
    processor = ImageProcessor.from_pretrained(world["checkpoint"])
    pics = probe_pictures(3, seed=1)
    feats = tower_features(vision, processor, [p["image"] for p in pics], batch=2)
    for (merged, patches), p in zip(feats, pics):
        gh, gw, d = patches.shape
        _, grid = processor([p["image"]])
        assert [gh, gw] == grid[0, 1:].tolist()
        blocks = patches.reshape(gh // 2, 2, gw // 2, 2, d).permute(0, 2, 1, 3, 4).reshape(-1, d)  # 2x2 blocks
        with torch.no_grad():
            torch.testing.assert_close(vision.merger(blocks), merged, rtol=1e-5, atol=1e-5)


def test_transplant_keeps_the_arm_tower_bit_identical_and_reinitialises_the_merger(world, tmp_path):
    base = Qwen25VL.from_pretrained(world["checkpoint"])
    arm = Qwen25VL.from_pretrained(world["checkpoint"])
    with torch.no_grad():  # an "arm": the base with a moved vision tower (merger included)
        for prm in arm.vision.parameters():
            prm.add_(0.01 * torch.randn_like(prm))
    arm.save_pretrained(str(tmp_path / "arm"))
    write_transplant(world["checkpoint"], str(tmp_path / "arm"), str(tmp_path / "init"), seed=3)
    init = Qwen25VL.from_pretrained(str(tmp_path / "init"))
    fresh = fresh_merger(base.config.vision, 3).state_dict()
    tower = lambda m: {n: t for n, t in m.vision.state_dict().items() if not n.startswith("merger.")}
    for n, t in tower(arm).items():
        assert torch.equal(tower(init)[n], t), n
    for n, t in init.vision.merger.state_dict().items():
        assert torch.equal(t, fresh[n]), n
        if n in ("fc1.weight", "fc2.weight"):  # norms start at ones and biases at zeros in every init
            assert not torch.equal(t, base.vision.merger.state_dict()[n]), n
            assert not torch.equal(t, arm.vision.merger.state_dict()[n]), n
    assert torch.equal(init.text.embed_tokens.weight, base.text.embed_tokens.weight)

    cmd = pivot.train_cmd(str(tmp_path / "init"), world["train"], str(tmp_path / "run"), "sft", "lora+projector",
                          3, 0)
    r = subprocess.run(cmd + ["--negatives", "2", "--lr", "1e-2", "--warmup-steps", "1"], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = Qwen25VL.from_pretrained(str(tmp_path / "run" / "merged"))
    for n, t in tower(init).items():
        assert torch.equal(tower(trained)[n], t), n
    moved = [n for n, t in init.vision.merger.state_dict().items()
             if not torch.equal(trained.vision.merger.state_dict()[n], t)]
    assert moved, "the merger did not train"


def test_pivot_runs_end_to_end(world, tmp_path):
    out = tmp_path / "pivot"
    args = ["--world", world["root"], "--out", str(out), "--seeds", "0", "--arm-steps", "2", "--transplant-steps", "2",
            "--probe-train", "24", "--probe-test", "12"]
    assert pivot.main(args) == 0
    table = (out / "pivot.md").read_text()
    assert "| dpo |" in table and "**Verdict.**" in table and "dpo - sft" in table
    results = json.loads((out / "results.json").read_text())
    assert set(results["arms"]) == {"base", "sft", "dpo", "infonce"}
    assert len(results["datasets"]) == 7  # the nine datasets less T->T and T->VD
    for arm in results["arms"].values():
        assert set(arm) == {"probe count", "probe colour", "probe shape", "probe position", "localisation",
                            "transplant nDCG@10"}
        assert all(v["ci95"][0] <= v["ci95"][1] and len(v["per_seed"]) == 1 for v in arm.values())
    assert results["weight_change"]["sft"][0] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "pivot.png").stat().st_size > 0
    before = (out / "results.json").read_text()
    assert pivot.main(args) == 0  # every unit done: nothing runs again, the same numbers
    assert (out / "results.json").read_text() == before
