"""train.py end to end on a small synthetic world, each run a subprocess (as a user runs it), CPU, fp32.

  - torchrun with 2 processes (gloo) == 1 process with the same global batch: losses and trained weights
  - stop at step 2 + --resume == uninterrupted run, bit for bit (weights, optimizer state, loss log)
  - a NaN loss stops training with a clear message and leaves the last good checkpoint untouched
  - each objective lowers its loss on one fixed batch (overfit check); DPO starts at exactly (1+N) log 2
  - the merged export loads (minigmr and transformers) and scores like the model with its adapter applied
  - --objective embed fits one batch, exports an embedder, and runs on the same DDP / exact-resume machinery
  - a prompt longer than --max-length is an error naming the record (never a silent truncation)
  - bad flags (out of range, nan / inf, not read by the chosen objective or --train mode), a checkpoint that does
    not fit and a log torn by a crash are named before any work; a step that makes weights non-finite saves nothing
  - --resume reads safetensors and JSON only: a code-running pickle planted in any file it reads is refused with a
    message naming the file, and never runs
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minigmr import peft_io, train_state
from minigmr.data import load_suite
from minigmr.metrics import evaluate
from minigmr.scoring import Reranker
from minigmr.embedding import EMBEDDER_FILE, Embedder
from minigmr.losses import yes_no_logits
from minigmr.model import Qwen25VL
from minigmr.processor import Processor
from minigmr.prompt import gmr_messages
from minigmr.synth import generate_world
from minigmr.train_data import NegativeSampler, load_training_data
from minigmr.weights import to_ours

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
LOGGED = ("loss", "sft_loss", "w_pos", "w_neg", "lr", "grad_norm")  # the deterministic fields of a log line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(str(tmp_path_factory.mktemp("world")), n_eval_queries=2, n_candidates=10, n_train=24,
                          pretrain_steps=0, first_stage="attributes")  # the machinery: random init is enough


def train(world, out, *extra, nproc=1, check=True, hooks=None):
    """Run train.py (under torchrun when nproc > 1) on the small world with small, fast settings; hooks: train.py's
    test-hook environment variables, e.g. {"MINIGMR_TEST_STOP_AFTER_STEP": 2}."""
    cmd = [sys.executable, TRAIN] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                       f"--nproc_per_node={nproc}", TRAIN]
    cmd += ["--model", world["checkpoint"], "--data", world["train"], "--out", str(out), "--negatives", "2",
            "--lr", "1e-3", "--warmup-steps", "1", *map(str, extra)]
    env = {**ENV, **{k: str(v) for k, v in (hooks or {}).items()}}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"train.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(ckpt):
    """Every trained tensor of a checkpoint folder: the adapter's and trainable.safetensors'."""
    out = {}
    for file in ("adapter/adapter_model.safetensors", "trainable.safetensors"):
        if os.path.exists(os.path.join(ckpt, file)):
            out.update(load_file(os.path.join(ckpt, file)))
    return out


# ------------------------------------------------------------------------------------------------ distributed
def test_torchrun_two_processes_equals_one_process(world, tmp_path):
    # lora+vision: text-only groups never run the vision tower (train.py ties its weights in with weight 0, so DDP
    # needs no unused-parameter search); they are saved in trainable.safetensors next to the adapter. Global batch
    # 4 groups in both runs, one group per micro-step: 2 processes x 2 accumulation vs 1 process x 4 accumulation,
    # so every micro-batch is identical and only the order of the gradient sums differs (all-reduce). Losses agree
    # to 1e-5. Weights agree to 1e-5 = 1% of one step at lr 1e-3: Adam divides by sqrt(v), which magnifies the
    # reordering of near-zero gradient entries (docs/experiments.md), while the weights move by ~lr per step.
    common = ["--train", "lora+vision", "--micro-batch", "1", "--steps", "3", "--save-every", "10"]
    r = train(world, tmp_path / "ddp", *common, "--grad-accum", "2", nproc=2)
    assert "find_unused_parameters" not in r.stderr  # torch's DDP warning, once per rank, is gone
    train(world, tmp_path / "one", *common, "--grad-accum", "4")
    ddp, one = log(tmp_path / "ddp"), log(tmp_path / "one")
    assert [x["step"] for x in ddp] == [x["step"] for x in one] == [1, 2, 3]
    for a, b in zip(ddp, one):
        for key in ("loss", "sft_loss", "w_pos", "w_neg"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    wa, wb = weights(tmp_path / "ddp" / "step-000003"), weights(tmp_path / "one" / "step-000003")
    assert wa.keys() == wb.keys() and any(k.startswith("visual.") for k in wa)
    start = load_file(os.path.join(world["checkpoint"], "model.safetensors"))
    moved = (wa["visual.merger.mlp.0.weight"] - start["visual.merger.mlp.0.weight"]).abs().max()
    assert moved > 1e-3  # the vision tower trained although some micro-batches had no image
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------ resume, NaN
# DPO with lora+projector: its reference is a frozen copy of the starting model, which a resumed run must rebuild
# from --model (not from the resumed weights); the projector lives in trainable.safetensors.
RESUME_ARGS = ["--objective", "dpo", "--train", "lora+projector", "--micro-batch", "2", "--grad-accum", "1",
               "--steps", "4", "--save-every", "2"]


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """An uninterrupted run, and the same run stopped after step 2 (its step-2 checkpoint kept) then resumed."""
    root = tmp_path_factory.mktemp("runs")
    full, split = root / "full", root / "split"
    train(world, full, *RESUME_ARGS)
    train(world, split, *RESUME_ARGS, hooks={"MINIGMR_TEST_STOP_AFTER_STEP": 2})
    assert sorted(os.listdir(split)) == ["log.jsonl", "step-000002"]  # no merged export, no later step
    step2 = {"weights": weights(split / "step-000002"), "log": log(split)}
    with open(split / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # what a crash in the middle of step 3's log append leaves
    resumed = train(world, split, *RESUME_ARGS, "--resume")
    return {"full": full, "split": split, "step2": step2, "resume_stderr": resumed.stderr}


def test_resume_equals_uninterrupted_run(runs):
    full, split = runs["full"], runs["split"]
    assert sorted(os.listdir(full)) == sorted(os.listdir(split)) == ["log.jsonl", "merged", "step-000004"]
    assert [{k: x[k] for k in ("step",) + LOGGED} for x in log(full)] == \
           [{k: x[k] for k in ("step",) + LOGGED} for x in log(split)]
    wa, wb = weights(full / "step-000004"), weights(split / "step-000004")
    assert wa.keys() == wb.keys() and "visual.merger.mlp.0.weight" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-exact: same data, same optimizer state, same order of ops
    oa = load_file(full / "step-000004" / "optimizer.safetensors")  # "<param index>.exp_avg_sq", ...
    ob = load_file(split / "step-000004" / "optimizer.safetensors")
    assert oa.keys() == ob.keys() and any(k.endswith(".exp_avg_sq") for k in oa)
    for i in oa:
        assert torch.equal(oa[i], ob[i]), i
    merged = load_file(os.path.join(full, "merged", "model.safetensors"))
    for k, v in load_file(os.path.join(split, "merged", "model.safetensors")).items():
        assert torch.equal(merged[k], v), k


def test_resume_drops_a_torn_last_log_line_with_a_warning(runs):
    assert f"train.py: warning: {runs['split'] / 'log.jsonl'}:3: dropped a torn last line" in runs["resume_stderr"]


@pytest.mark.parametrize("lines, error", [
    (['{"step": 1}\n', '{"step": 2, "loss": 0.6{"step": 3}\n'], r"log.jsonl:2: Expecting ',' delimiter"),  # torn, then
    # appended to by a later run: the torn line is no longer the last
    (['{"step": 1}\n', '\n', '{"step": 2}\n'], r"log.jsonl:2: Expecting value"),
    (['{"step": 1}\n', '{"step": 2, "loss": 0.6\n'], r"log.jsonl:2: Expecting"),  # has its newline: not torn
    (['{"step": 1}\n', '[2]\n'], r"log.jsonl:2: expected a JSON object with an integer 'step'"),
    ([b'{"step": 1}\n', b'{"step": 2, "note": "\xff"}\n'], r"log.jsonl:2: 'utf-8' codec can't decode byte 0xff"),
])
def test_a_bad_log_line_is_an_error_naming_file_and_line(tmp_path, lines, error):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    with pytest.raises(ValueError, match=error):
        train_state.read_log(str(path), 3)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "loss"')  # only a torn LAST line is dropped
    assert train_state.read_log(str(path), 3) == (['{"step": 1}\n', '{"step": 2}\n'],
                                                  f"{path}:3: dropped a torn last line (a crash while it was "
                                                  "written): b'{\"step\": 3, \"loss\"'")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(world, runs, tmp_path):
    out = tmp_path / "nan"
    r = train(world, out, *RESUME_ARGS, hooks={"MINIGMR_TEST_INJECT_NAN_AT_STEP": 3}, check=False)
    assert r.returncode == 1
    assert "step 3: non-finite loss nan" in r.stderr and "last good checkpoint" in r.stderr, r.stderr[-2000:]
    assert str(out / "step-000002") in r.stderr
    assert sorted(os.listdir(out)) == ["log.jsonl", "step-000002"]  # nothing of step 3 saved, no merged export
    assert [x["step"] for x in log(out)] == [1, 2]
    # the checkpoint left in place is exactly the good state after step 2
    good = runs["step2"]["weights"]
    kept = weights(out / "step-000002")
    assert kept.keys() == good.keys()
    for k in good:
        assert torch.equal(kept[k], good[k]), k


# ------------------------------------------------------------------------------------------------ objectives
@pytest.mark.parametrize("objective, extra", [
    ("sft", ["--train", "full"]),
    ("infonce", ["--train", "full"]),
    ("dpo", ["--train", "lora", "--beta", "1.0", "--lr", "2e-3"]),  # reference = the weights with adapters off
    ("url", ["--train", "full", "--weight", "cl", "--direction", "sft"]),
])
def test_each_objective_fits_one_batch(world, tmp_path, objective, extra):
    # From the random-init tiny model the loss first sits near its prior, then falls fast (docs/experiments.md);
    # a model that did not learn stays near its prior, 3 log 2 = 2.1 (SFT) / log 3 = 1.1 (InfoNCE).
    steps = 25
    r = train(world, tmp_path, "--objective", objective, *extra, "--overfit-one-batch", "--micro-batch", "2",
              "--grad-accum", "1", "--steps", steps, "--schedule", "constant", "--save-every", steps)
    lines = log(tmp_path)
    assert len(lines) == steps
    # URL's value is not a loss (only its gradient is meaningful, losses.url_loss): watch the SFT loss instead
    key = "sft_loss" if objective == "url" else "loss"
    assert f" {key}=" in r.stderr and (objective != "url" or " loss=" not in r.stderr)  # so does the progress bar
    first, last3 = lines[0][key], sum(x[key] for x in lines[-3:]) / 3
    assert last3 < 0.3 * first, [round(x[key], 3) for x in lines]
    if objective == "dpo":  # policy == reference at step 1: every pair has margin 0, loss (1+N) log 2 per group
        assert first == pytest.approx(3 * math.log(2), abs=1e-6)
    for x in lines:
        assert 0 <= x["w_pos"] <= 1 and 0 <= x["w_neg"] <= 1  # W_SFT, W_CL in [0, 1]; W_DPO in (0, beta = 1)
    # the export says which score to read it with: the yes logit after InfoNCE, p(yes) otherwise (this url: D_SFT)
    with open(os.path.join(tmp_path, "merged", "minigmr_reranker.json")) as f:
        assert json.load(f) == {"score": "cl" if objective == "infonce" else "sft"}


def test_embed_objective_fits_one_batch_and_exports_an_embedder(world, tmp_path):
    """--objective embed: the contrastive loss over the batch falls on one fixed batch (from log(1+N) x G docs), the
    next-token term on the records' descriptions adds to it, and the export is an embedder, not a reranker."""
    steps = 25
    train(world, tmp_path, "--objective", "embed", "--train", "full", "--overfit-one-batch", "--micro-batch", "4",
          "--grad-accum", "1", "--steps", steps, "--schedule", "constant", "--save-every", steps, "--lm-weight", "0")
    lines = log(tmp_path)
    first, last3 = lines[0]["loss"], sum(x["loss"] for x in lines[-3:]) / 3
    assert last3 < 0.3 * first, [round(x["loss"], 3) for x in lines]
    assert all(x["w_pos"] >= 0 and x["w_neg"] >= 0 for x in lines)
    merged = os.path.join(tmp_path, "merged")
    assert os.path.isfile(os.path.join(merged, EMBEDDER_FILE))
    assert not os.path.exists(os.path.join(merged, "minigmr_reranker.json"))
    e = Embedder.from_pretrained(merged).embed(["two red circles on the left", "one blue star"])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))
    with_lm = tmp_path / "lm"
    train(world, with_lm, "--objective", "embed", "--train", "lora", "--overfit-one-batch", "--micro-batch", "4",
          "--grad-accum", "1", "--steps", 1, "--lm-weight", "1", "--cl-weight", "0")
    # contrastive weight 0: the loss is the next-token loss alone, near log(vocabulary) for the random model
    assert 0.5 * math.log(600) < log(with_lm)[0]["loss"] < 2 * math.log(600)


def test_embed_under_torchrun_and_resume(world, tmp_path):
    """--objective embed runs on the same machinery: 2 processes == 1 process with the same micro-batches (the
    in-batch negatives are each micro-batch's), and stop after step 2 + --resume == the uninterrupted run."""
    common = ["--objective", "embed", "--train", "lora", "--micro-batch", "2", "--steps", "3", "--save-every", "1",
              "--lm-weight", "0.5"]
    train(world, tmp_path / "ddp", *common, "--grad-accum", "1", nproc=2)
    train(world, tmp_path / "one", *common, "--grad-accum", "2")
    train(world, tmp_path / "split", *common, "--grad-accum", "2", hooks={"MINIGMR_TEST_STOP_AFTER_STEP": 2})
    train(world, tmp_path / "split", *common, "--grad-accum", "2", "--resume")
    ddp, one, split = log(tmp_path / "ddp"), log(tmp_path / "one"), log(tmp_path / "split")
    assert [x["step"] for x in ddp] == [x["step"] for x in one] == [1, 2, 3]
    for a, b, c in zip(ddp, one, split):
        for key in ("loss", "w_pos", "w_neg", "lr", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
            assert c[key] == b[key], (c["step"], key)  # resumed: bit for bit
    last = lambda run: weights(tmp_path / run / "step-000003")
    for k, w in last("one").items():
        torch.testing.assert_close(last("ddp")[k], w, rtol=0, atol=1e-5, msg=k)
        assert torch.equal(last("split")[k], w), k


# ------------------------------------------------------------------------------------------------ merged export
def _batch(world, n=6):
    proc = Processor.from_pretrained(world["checkpoint"])
    recs = load_training_data(world["train"])
    item = lambda x: {"text": x.text, "image": x.image}
    chats = [gmr_messages(r.instruction, item(r.query), item(d)) for r in recs[:n] for d in (r.positives[0],
                                                                                           r.hard_negatives[0])]
    return proc, proc.apply_chat(chats, padding_side="left")


def _yes_no(model, proc, batch):
    with torch.no_grad():
        h, _ = model.hidden_states(**batch)
        return yes_no_logits(h[:, -1], model.head_rows([proc.token_id("yes"), proc.token_id("no")]))


def test_merged_export_scores_like_base_plus_adapter(world, runs):
    run = runs["full"]
    merged_dir = os.path.join(run, "merged")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.exists(os.path.join(merged_dir, name)), name
    # the trained model rebuilt from the base checkpoint + the saved adapter + the saved projector
    trained = Qwen25VL.from_pretrained(world["checkpoint"])
    peft_io.load_adapter(trained, os.path.join(run, "step-000004", "adapter"))
    params = dict(trained.named_parameters())
    for k, v in load_file(os.path.join(run, "step-000004", "trainable.safetensors")).items():
        params[to_ours(k)].data.copy_(v)
    merged = Qwen25VL.from_pretrained(merged_dir)
    base = Qwen25VL.from_pretrained(world["checkpoint"])
    proc, batch = _batch(world)
    want = _yes_no(trained, proc, batch)
    torch.testing.assert_close(_yes_no(merged, proc, batch), want, rtol=0, atol=1e-4)
    assert (_yes_no(base, proc, batch) - want).abs().max() > 1e-3  # training changed the scores

    # transformers (the oracle) loads the export and gives the same last-position yes/no logits
    from transformers import Qwen2_5_VLForConditionalGeneration
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(**batch, mm_token_type_ids=(batch["input_ids"] == proc.image_pad_id).long(),
                    use_cache=False).logits[:, -1]
    torch.testing.assert_close(logits[:, [proc.token_id("yes"), proc.token_id("no")]], want, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input
def test_prompt_longer_than_max_length_is_an_error(world, tmp_path):
    r = train(world, tmp_path, "--train", "lora", "--steps", "1", "--max-length", "20", check=False)
    assert r.returncode != 0
    assert "--max-length 20" in r.stderr and "record 'train-" in r.stderr and "never truncates" in r.stderr
    assert not any(d.startswith("step-") for d in os.listdir(tmp_path))


@pytest.mark.parametrize("flags, hooks, error", [
    # finite loss and gradient norm, but the update leaves a trained weight NaN (the hook stands in for any cause)
    ([], {"MINIGMR_TEST_INJECT_NAN_WEIGHT_AT_STEP": 2},
     "step 2: the optimizer step made 1 trained weight tensor(s) non-finite, e.g. ['text.layers.0.attn.q_proj.lora_a']"),
    # lr 1e39 is a finite float, but not AdamW's float32 step size: torch refuses the update
    (["--lr", "1e39"], {}, "step 1: the optimizer step failed (value cannot be converted to type float without "
                           "overflow) at lr 5e+38"),
])
def test_a_failed_or_non_finite_update_saves_nothing(world, tmp_path, flags, hooks, error):
    r = train(world, tmp_path, "--train", "lora", "--micro-batch", "1", "--grad-accum", "1", "--steps", "3",
              "--save-every", "1", *flags, hooks=hooks, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"train.py: error: {error}" in r.stderr, r.stderr[-2000:]
    good = [f"step-{k:06d}" for k in range(1, hooks.get("MINIGMR_TEST_INJECT_NAN_WEIGHT_AT_STEP", 1))]
    assert f"last good checkpoint: {tmp_path / good[-1] if good else 'none (none written yet)'}" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl", *good]  # nothing of the failed step
    assert [x["step"] for x in log(tmp_path)] == list(range(1, len(good) + 1))


@pytest.mark.parametrize("flags, errors", [
    (["--lr", "-1", "--weight-decay", "-1", "--max-grad-norm", "-1", "--seed", "-1", "--negatives", "0",
      "--hard-ratio", "1.5", "--train", "lora", "--lora-rank", "0", "--lora-alpha", "0", "--lora-dropout", "1.5",
      "--warmup-steps", "-5", "--max-pixels", "0", "--epochs", "0", "--objective", "url", "--weight", "cl",
      "--temperature", "0", "--tau", "2", "--max-length", "0", "--out", "{file}"],
     ["--lr -1.0: must be a finite number > 0", "--weight-decay -1.0: must be a finite number >= 0",
      "--max-grad-norm -1.0: must be a finite number >= 0 (0: no clipping)", "--seed -1: must be in 0..4294967295",
      "--negatives 0: must be >= 1", "--hard-ratio 1.5: must be a finite number in [0, 1]",
      "--lora-rank 0: must be >= 1", "--lora-alpha 0.0: must be a finite number > 0",
      "--lora-dropout 1.5: must be a finite number in [0, 1)", "--warmup-steps -5: must be >= 0",
      "--max-pixels 0: must be > 0", "--epochs 0.0: must be a finite number > 0",
      "--temperature 0.0: must be a finite number > 0", "--tau 2.0: must be a finite number in [0, 1]",
      "--max-length 0: must be >= 1", "--out {file}: exists and is not a folder"]),
    (["--lr", "inf", "--max-grad-norm", "nan", "--epochs", "inf", "--objective", "dpo", "--beta", "nan",
      "--label-smoothing", "inf", "--train", "lora", "--lora-alpha", "inf"],
     ["--lr inf: must be a finite number > 0", "--max-grad-norm nan: must be a finite number >= 0",
      "--epochs inf: must be a finite number > 0", "--beta nan: must be a finite number > 0",
      "--label-smoothing inf: must be a finite number in [0, 0.5]", "--lora-alpha inf: must be a finite number > 0"]),
    (["--objective", "sft", "--train", "full", "--temperature", "1", "--beta", "0.1", "--label-smoothing", "0",
      "--tau", "0.1", "--weight", "cl", "--direction", "cl", "--lora-rank", "4", "--lora-alpha", "8",
      "--lora-dropout", "0.1", "--lora-targets", "q_proj", "--vision-lora-targets", "qkv", "--steps", "2",
      "--epochs", "1"],
     ["--temperature is not read with --objective sft --train full, only with --objective infonce, or url with "
      "--weight cl", "--beta is not read with --objective sft --train full, only with --objective dpo",
      "--label-smoothing is not read", "--tau is not read", "--weight is not read", "--direction is not read",
      "--lora-rank is not read with --objective sft --train full, only with --train lora, lora+projector or "
      "lora+vision", "--lora-alpha is not read", "--lora-dropout is not read", "--lora-targets is not read",
      "--vision-lora-targets is not read", "give --steps or --epochs, not both"]),
    (["--objective", "url", "--weight", "sft", "--temperature", "2"], ["--temperature is not read with --objective url"]),
    (["--lm-weight", "0", "--embed-temperature", "-1"], ["--embed-temperature -1.0: must be a finite number > 0",
                                                         "--embed-temperature is not read with --objective sft",
                                                         "--lm-weight is not read with --objective sft"]),
    (["--eval-queries", "0", "--eval-depth", "5"], ["--eval-queries 0: must be >= 1", "--eval-queries is not read "
     "with --objective sft --train lora, only with --eval-every K > 0", "--eval-depth is not read"]),
    (["--eval-every", "2"], ["--eval-every with --data needs --eval-suite"]),
    (["--eval-every", "-1"], ["--eval-every -1: must be >= 0 (0: never)"]),
    (["--objective", "embed", "--cl-weight", "0", "--lm-weight", "0"],
     ["--cl-weight 0 and --lm-weight 0: the embed objective would train on nothing"]),
    (["--objective", "embed", "--eval-every", "2", "--eval-suite", "x"],
     ["--eval-every is not read with --objective embed"]),
])
def test_bad_flags_are_each_named_before_any_work(world, tmp_path, flags, errors):
    out, file = tmp_path / "out", tmp_path / "file"
    file.write_text("not a folder")
    r = train(world, out, *(x.format(file=file) for x in flags), check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("train.py: error: "), r.stderr
    for error in errors:
        assert error.format(file=file) in r.stderr, (error, r.stderr)
    assert r.stderr.count("\n  ") == len(errors) - 1  # one line per problem, nothing else refused
    assert not out.exists()  # nothing written


def test_log_has_elapsed_time_reduction_and_the_held_out_check(world, tmp_path):
    out = tmp_path / "watched"
    train(world, out, "--objective", "infonce", "--steps", "3", "--eval-every", "2", "--eval-suite", world["suite"],
          "--eval-depth", "5")
    lines = log(out)
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert all(x["loss_reduction"] == "one (1+N)-way cross-entropy per group, mean over groups" for x in lines)
    elapsed = [x["elapsed_s"] for x in lines]
    assert 0 < elapsed[0] <= elapsed[1] <= elapsed[2]
    assert "val_ndcg@10" not in lines[0]  # every 2 steps, and at the last
    # 9 datasets x 2 queries (the world has 2 per dataset, fewer than the default 4); the metric as eval.py defines it
    suite = load_suite(world["suite"])
    for x in lines[1:]:
        assert x["val_queries"] == 18 and 0 <= x["val_ndcg@10"] <= 1
    # the check at the last step is the trained model's own: rerun it on the merged export with eval.py's metric
    rr = Reranker.from_pretrained(str(out / "merged"), dtype=torch.float32)
    per_dataset = []
    for ds in suite:
        run = {q: dict(zip(ds.candidates(q)[:5], rr.score(ds.queries[q].as_input(),
                                                         [ds.corpus[d].as_input() for d in ds.candidates(q)[:5]],
                                                         ds.instruction))) for q in sorted(ds.queries)[:4]}
        per_dataset.append(evaluate({q: ds.qrels.get(q, {}) for q in run}, run, ["ndcg@10"])["ndcg@10"])
    assert rr.score_type == "cl"  # InfoNCE ranks by z_yes, in the check as in eval.py
    assert lines[2]["val_ndcg@10"] == pytest.approx(sum(per_dataset) / len(per_dataset), abs=1e-6)


def _checkpoint_copy(world, tmp_path, edit):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(world["checkpoint"], ckpt)
    edit(ckpt)
    return ckpt


@pytest.mark.parametrize("edit, flags, error", [
    (lambda c: None, ["--max-pixels", "100"], "--max-pixels 100: below min_pixels 3136 of {c}/preprocessor_config.json"),
    (lambda c: (c / "config.json").write_text((c / "config.json").read_text().replace('"float32"', '"bogus"')), [],
     "{c}/config.json: torch_dtype 'bogus' is not one of float32, bfloat16, float16"),
    (lambda c: (c / "tokenizer.json").unlink(), [], "tokenizer.json"),
])
def test_a_checkpoint_that_cannot_be_trained_or_exported_is_refused_before_training(world, tmp_path, edit, flags,
                                                                                    error):
    ckpt = _checkpoint_copy(world, tmp_path, edit)
    r = train(world, tmp_path / "out", "--model", ckpt, "--steps", "1", *flags, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert error.format(c=ckpt) in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------------ training data
@pytest.mark.parametrize("record, error", [
    ({"positives": ["p", "n", "p"]}, r"train.jsonl:1: id 'r': positives\[2\] repeats positives\[0\]"),
    ({"hard_negatives": ["x", {"text": "x"}]}, r"train.jsonl:1: id 'r': hard_negatives\[1\] repeats hard_negatives\[0\]"),
    ({"instruction": "  "}, r"train.jsonl:1: id 'r': 'instruction' must be a string \(not empty\), got '  '"),
])
def test_training_data_refuses_repeated_docs_and_an_empty_instruction(tmp_path, record, error):
    # a doc listed twice would be sampled twice as often, silently; an empty instruction prompts with nothing
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"id": "r", "instruction": "Find it.", "query": "q", "positives": ["p"], **record}))
    with pytest.raises(ValueError, match=error):
        load_training_data(path)


@pytest.mark.parametrize("kwargs, error", [({"num_negatives": 2.5}, "num_negatives must be an int >= 0, got 2.5"),
                                           ({"num_negatives": "2"}, "num_negatives must be an int >= 0, got '2'"),
                                           ({"num_negatives": 2, "hard_ratio": "0.5"}, "hard_ratio must be a number")])
def test_negative_sampler_checks_argument_types(world, kwargs, error):
    with pytest.raises(ValueError, match=error):
        NegativeSampler(load_training_data(world["train"]), **kwargs)
