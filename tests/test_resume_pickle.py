"""--resume never unpickles: every file it reads is safetensors or JSON, and a code-running pickle planted in any of
them (or next to them, as an older minigmr's state.pt / optimizer.pt, or a .pt / .bin where a safetensors is
expected) is refused with a message naming the file, while its payload never runs. Damaged files are named too.

The checkpoint is written in-process by train_state.save_checkpoint, as train.py writes it (LoRA + a trained
projector, AdamW after one step); a resume is train.py's sequence read_state -> load_checkpoint -> set_rng_state.
"""
import os
import pathlib
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from minigmr import train_state
from minigmr.lora import TEXT_TARGETS, inject_lora, lora_parameters, mark_only_lora_trainable
from minigmr.model import Qwen25VL
from minigmr.synth import generate_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


class Payload:
    """Unpickling this touches `marker`: the stand-in for any code a hostile checkpoint would run."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp("world")), n_eval_queries=2, n_candidates=10, n_train=24,
                          pretrain_steps=0)


def build(world):
    """train.py's model and optimizer for --train lora+projector (LoRA r 16 on the text projections)."""
    model = Qwen25VL.from_pretrained(world["checkpoint"])
    inject_lora(model, 16, 32, 0.0, TEXT_TARGETS, [], seed=0)
    mark_only_lora_trainable(model, ("vision.merger.",))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3), {id(p) for p in lora_parameters(model)}


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    model, optimizer, lora_ids = build(world)
    sum((p.float() ** 2).sum() for p in optimizer.param_groups[0]["params"]).backward()
    optimizer.step()  # AdamW now has exp_avg, exp_avg_sq and step for every trained tensor
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    out = str(tmp_path_factory.mktemp("run"))
    args = {"model": world["checkpoint"], "world_size": 1, "lr": 1e-3}
    path = train_state.save_checkpoint(out, 2, model, optimizer, lora_ids, args, [train_state.rng_state_bytes()])
    return {"path": path, "optimizer": optimizer.state_dict(), "rng": (random.random(), np.random.rand(),
                                                                      torch.rand(1).item())}


def resume(world, path):
    """train.py --resume's reads, in its order; -> the optimizer it loaded into."""
    state = train_state.read_state(path)
    model, optimizer, lora_ids = build(world)
    train_state.load_checkpoint(path, model, optimizer, lora_ids)
    train_state.set_rng_state(path, 0)
    assert state["step"] == 2
    return optimizer


def test_an_intact_checkpoint_resumes_exactly(world, checkpoint):
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = resume(world, checkpoint["path"]).state_dict()
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == checkpoint["rng"]
    saved = checkpoint["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"] and loaded["state"].keys() == saved["state"].keys()
    for i, state in saved["state"].items():
        assert state.keys() == loaded["state"][i].keys()
        for key, value in state.items():
            assert torch.equal(loaded["state"][i][key], value), (i, key)
    assert sorted(os.listdir(checkpoint["path"])) == ["adapter", "optimizer.json", "optimizer.safetensors",
                                                      "rng-00000.safetensors", "state.json", "trainable.safetensors"]


def _pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump(Payload(marker), f)


def _torch_save(path, marker):  # the zip format of torch.save: what state.pt / optimizer.pt were
    torch.save({"state": Payload(marker)}, path)


NEVER = "minigmr never unpickles"
# (file planted, how, file to delete first, what the message says besides the file's path)
PLANTS = [
    ("state.json", _pickle, None, "not valid JSON"),
    ("optimizer.json", _pickle, None, "not valid JSON"),
    ("optimizer.safetensors", _torch_save, None, "it looks like a pickle"),
    ("rng-00000.safetensors", _pickle, None, "it looks like a pickle"),
    ("trainable.safetensors", _torch_save, None, "it looks like a pickle"),
    ("adapter/adapter_model.safetensors", _torch_save, None, "not a readable safetensors file"),
    ("adapter/adapter_config.json", _pickle, None, "not valid JSON"),
    ("state.pt", _torch_save, None, NEVER),  # next to the safe files: still refused
    ("optimizer.pt", _torch_save, None, NEVER),
    ("adapter/adapter_model.bin", _torch_save, "adapter/adapter_model.safetensors", NEVER),
    ("trainable.pt", _torch_save, "trainable.safetensors", NEVER),  # a .pt where a safetensors is expected
    ("rng-00000.pkl", _pickle, "rng-00000.safetensors", NEVER),
]


@pytest.mark.parametrize("name, plant, delete, says", PLANTS, ids=[p[0] for p in PLANTS])
def test_a_planted_pickle_is_refused_and_never_runs(world, checkpoint, tmp_path, name, plant, delete, says):
    marker = tmp_path / "PWNED"
    plant(tmp_path / "live", marker)
    with open(tmp_path / "live", "rb") as f:
        pickle.load(f) if plant is _pickle else torch.load(f, weights_only=False)
    assert marker.exists()  # the payload is live: unpickling it runs code
    marker.unlink()

    path = tmp_path / "step-000002"
    shutil.copytree(checkpoint["path"], path)
    if delete:
        os.remove(path / delete)
    plant(path / name, marker)
    with pytest.raises(ValueError) as e:
        resume(world, str(path))
    assert str(e.value).startswith(f"{path / name}:") and says in str(e.value), str(e.value)  # path: or path:line:
    assert not marker.exists()


def test_an_older_minigmr_checkpoint_is_refused_by_train_py(world, tmp_path):
    # the layout train.py wrote before: state.pt and optimizer.pt (torch.save pickles) and no JSON
    marker, step = tmp_path / "PWNED", tmp_path / "out" / "step-000002"
    step.mkdir(parents=True)
    _torch_save(step / "optimizer.pt", marker)
    _torch_save(step / "state.pt", marker)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", world["checkpoint"], "--data",
                        world["train"], "--out", str(tmp_path / "out"), "--resume"],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"train.py: error: --resume: {step / 'optimizer.pt'}: a pickle file; {NEVER}" in r.stderr
    assert "cannot be resumed: train again into a new --out" in r.stderr
    assert not marker.exists()


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("name, damage, says", [
    ("optimizer.safetensors", _truncate, "not a readable safetensors file"),
    ("rng-00000.safetensors", _truncate, "not a readable safetensors file"),
    ("trainable.safetensors", _truncate, "not a readable safetensors file"),
    ("adapter/adapter_model.safetensors", _truncate, "not a readable safetensors file"),
    ("state.json", _truncate, "not valid JSON"),
    ("optimizer.json", os.remove, "missing; not a complete minigmr checkpoint"),
    ("rng-00000.safetensors", os.remove, "missing (the run had 1 process(es))"),
    ("trainable.safetensors", os.remove, "missing, but this run trains 5 non-LoRA weights"),
    ("state.json", lambda p: p.write_text('{"step": 3, "args": {"world_size": 1}}'),
     "says step 3, but the folder is step-000002"),
    ("optimizer.json", lambda p: p.write_text('{"param_groups": [], "state": {}}'), "does not fit this run's optimizer"),
])
def test_a_damaged_checkpoint_file_is_named(world, checkpoint, tmp_path, name, damage, says):
    path = tmp_path / "step-000002"
    shutil.copytree(checkpoint["path"], path)
    damage(path / name)
    with pytest.raises(ValueError) as e:
        resume(world, str(path))
    assert str(e.value).startswith(f"{path / name}: ") and says in str(e.value), str(e.value)
