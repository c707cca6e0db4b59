"""
Train a GMR reranker (Qwen2.5-VL answering "yes"/"no" to "does this document fit the query?") with SFT,
InfoNCE, DPO or the unified reranking loss (gmr.md §2, §6). One file, read top to bottom, nanoGPT style.

To run on one process (CPU, or one GPU), e.g. the tiny synthetic demo (the world, with its caption-pretrained
checkpoint, is generated on first use: ~3 minutes on a 2-core CPU):
$ python train.py --objective sft

To run with DDP on 8 GPUs of one node, e.g. the paper's recipe (LoRA r=16, lr 1e-4, 16 negatives, gmr.md §3):
$ torchrun --standalone --nproc_per_node 8 train.py --model Qwen2.5-VL-7B-Instruct --data train.jsonl \
      --train lora --negatives 16 --lr 1e-4 --micro-batch 1 --grad-accum 4 --epochs 1 --grad-checkpointing

To run with DDP on 2 nodes of 8 GPUs each:
- run on the first (master) node, example IP 123.456.123.456:
$ torchrun --nnodes 2 --node_rank 0 --master_addr 123.456.123.456 --master_port 29500 --nproc_per_node 8 train.py ...
- run on the worker node:
$ torchrun --nnodes 2 --node_rank 1 --master_addr 123.456.123.456 --master_port 29500 --nproc_per_node 8 train.py ...
(If your cluster does not have an Infiniband interconnect, prepend NCCL_IB_DISABLE=1.)

One optimizer step sees a global batch of micro_batch x world_size x grad_accum groups; a group is one
(instruction, query) with its positive and N negatives, i.e. 1+N prompts. The global batch of step k is a pure
function of (--seed, k), drawn identically on every rank; each rank takes its slice. So 1 process with the same
global batch computes the same gradient (up to float summation order), and --resume continues bit-exactly.

Per micro-batch of G groups: scoring.group_logits runs the G shared prefixes (system + instruction + query, incl.
the query image) once, then the G*(1+N) documents on top of their group's prefix keys/values, the vision tower once
per distinct image -> last position h (G*(1+N), D) -> [z_yes, z_no] = h @ [M_yes; M_no]^T in fp32 -> (G, 1+N, 2)
-> the loss (losses.py). Same maths as 1+N full prompts each (tested), ~1.7x less work on the demo; the
(B, S, vocab) logits are never built.

What DPO means here (losses.dpo_loss): for every (query, document) the chosen answer is "yes" for the positive and
"no" for a negative, the rejected one the other; the reference policy is the model at the start of training
(with LoRA only: the same weights with the adapters switched off). Started from the tiny demo checkpoint (caption-
pretrained, never asked yes/no) the reference's yes/no odds say nothing about relevance, so DPO is SFT with a weight
beta * (1 - sigmoid(beta * margin)) that fades once the model has moved ~1/beta logits away from the reference
(losses.dpo_weight_direction).

Outputs in --out (layout in minigmr/trainer.py): log.jsonl (one line per logged step), step-NNNNNN/ (the latest
checkpoint: adapter/ in peft format, trainable.safetensors for trained non-LoRA weights under their official names,
optimizer, RNG states, args) and merged/ (the trained model in the official Qwen2.5-VL layout with the processor
files: loads in eval.py --model, Qwen25VL.from_pretrained and transformers).
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minigmr import losses, trainer
from minigmr.data import NegativeSampler, load_training_data
from minigmr.lora import (TEXT_TARGETS, VISION_TARGETS, disable_adapters, inject_lora, lora_parameters,
                          mark_only_lora_trainable)
from minigmr.model import Qwen25VL
from minigmr.processor import Processor
from minigmr.scoring import PromptTooLong, group_logits
from minigmr.synth import ensure_world

DEMO_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synth")
# Per-objective peak lr for the tiny demo. Chosen when the demo checkpoint was still random-init, on the synthetic
# world's nine-task mix (8 groups of 1+2 per step, 10 minutes): 5e-4 left the initial plateau (constant p(yes)) after
# ~5,000 groups, 1e-3 was still on it after 9,500, 3e-4 no faster. Checked again on the caption-pretrained
# checkpoint (sft, 2,000 steps, nDCG@10 from 0.175): 1e-3 -> 0.185, 2.5e-4 -> 0.262, 5e-4 -> 0.282 / 0.312.
DEFAULT_LR = {"sft": 5e-4, "infonce": 5e-4, "dpo": 5e-4, "url": 5e-4}
# Per-objective default steps (when neither --steps nor --epochs is given): the tiny demo within 10 minutes on a fresh
# 2-core CPU, world generation (~2 min 50 s) included. Measured here: sft / infonce 2,000 steps in 5.5 minutes;
# dpo's reference forward makes a step 1.4x dearer (2,000 steps: 7.9 minutes), so it gets 1,500.
DEFAULT_STEPS = {"sft": 2000, "infonce": 2000, "dpo": 1500, "url": 2000}
# What each --train mode trains besides the LoRA adapters (mark_only_lora_trainable's also_train prefixes).
TRAIN_MODES = {"lora": (), "lora+projector": ("vision.merger.",), "lora+vision": ("vision.",), "full": None}

# ----------------------------------------------------------------------------------------------------- arguments
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
a = p.add_argument
a("--model", default=None, help="Qwen2.5-VL checkpoint folder (config.json + safetensors + tokenizer.json + "
  "preprocessor_config.json). Default: the tiny caption-pretrained checkpoint of the synthetic world in "
  "data/synth (generated if absent: ~3 minutes on a 2-core CPU, most of it the pretraining)")
a("--data", default=None, help="training JSONL (minigmr/data.py format (b)). Default: the synthetic world's")
a("--objective", default="sft", choices=["sft", "infonce", "dpo", "url"],
  help="sft: yes/no cross-entropy per document (GMR's choice); infonce: softmax over the group's yes logits; "
  "dpo: yes-vs-no preference against the starting model; url: unified reranking loss, any --weight with any "
  "--direction (gmr.md §2.3)")
a("--weight", default="sft", choices=["sft", "cl", "ones"], help="url only: weight source W (gmr.md §2.2)")
a("--direction", default="sft", choices=["sft", "cl"], help="url only: direction source D (gmr.md §2.2)")
a("--tau", type=float, default=None, help="url only: zero the weight of documents already learned "
  "(positive p(yes) > 1-tau, negative p(yes) < tau), the paper's tau-mask (Table 2). Default: no mask")
a("--temperature", type=float, default=1.0, help="InfoNCE temperature (also url with --weight cl); the paper "
  "reports none, i.e. 1")
a("--beta", type=float, default=0.1, help="DPO beta (Rafailov et al. and PIVOT: 0.1)")
a("--label-smoothing", type=float, default=0.0, help="DPO conservative label smoothing eps in [0, 0.5]")
a("--train", default=None, choices=list(TRAIN_MODES), help="what trains. lora: LoRA adapters only (the paper); "
  "lora+projector: + the patch merger; lora+vision: + the whole vision tower (as PIVOT trains it); full: every "
  "weight, no LoRA. Default: full for the built-in tiny demo model (1.0M weights that must learn the task in "
  "minutes on a CPU), lora when --model is given")
a("--lora-rank", type=int, default=16, help="LoRA rank r (the paper: 16)")
a("--lora-alpha", type=float, default=32, help="LoRA alpha; scaling = alpha / r (paper: not reported)")
a("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (0: runs are deterministic)")
a("--lora-targets", nargs="+", default=list(TEXT_TARGETS), choices=TEXT_TARGETS,
  help="text decoder projections that get LoRA (default: all seven)")
a("--vision-lora-targets", nargs="*", default=[], choices=VISION_TARGETS,
  help="vision tower projections that get LoRA (default: none)")
a("--negatives", type=int, default=2, help="negatives N per query (paper: 16; its analysis runs: 4; the default 2 "
  "keeps the CPU demo within minutes)")
a("--hard-ratio", type=float, default=0.5, help="share of the N negatives taken from the record's hard negatives "
  "(the rest: random documents of the records with the same instruction); 0.5 = the paper's 1:1")
a("--lr", type=float, default=None, help=f"peak learning rate (AdamW). Default per objective: {DEFAULT_LR} "
  "(tiny demo; the paper uses 1e-4 with LoRA on 3B/7B)")
a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
a("--schedule", default="cosine", choices=["cosine", "linear", "constant"], help="lr schedule after warm-up "
  "(cosine and linear decay to 0 at the last step)")
a("--warmup-steps", type=int, default=None, help="linear warm-up steps. Default: 5%% of the steps")
a("--steps", type=int, default=None, help="optimizer steps (default unless --epochs is given: 2000, dpo 1500; "
  "the tiny demo's ~5.5 minutes on a 2-core CPU, ~6 for dpo)")
a("--epochs", type=float, default=None, help="train for this many passes over the records instead of --steps")
a("--micro-batch", type=int, default=4, help="groups per forward pass per process (a group = 1+N prompts)")
a("--grad-accum", type=int, default=2, help="micro-steps per optimizer step per process; global batch = "
  "micro_batch x world_size x grad_accum groups")
a("--grad-checkpointing", action="store_true", help="recompute layer activations in backward (less memory)")
a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="compute dtype. auto: bf16 autocast on a GPU "
  "that supports it, fp32 on CPU (bf16 matmuls are very slow there). Losses and scores are always fp32; "
  "trained weights are kept in fp32")
a("--max-pixels", type=int, default=None, help="cap on image pixels (tokens = pixels / 784). Default: the "
  "checkpoint's preprocessor_config.json")
a("--max-length", type=int, default=3200, help="longest allowed prompt in tokens (paper: 3200). Longer prompts "
  "stop training with an error naming the record: minigmr never truncates")
a("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this (0: no clipping)")
a("--overfit-one-batch", action="store_true", help="debugging: train on the first global batch at every step; "
  "the loss must then go towards 0")
a("--seed", type=int, default=0, help="seed for LoRA init, data order and negative sampling")
a("--out", default=None, help="output folder (default: out/<objective>)")
a("--save-every", type=int, default=100, help="save a checkpoint every K steps (and always at the end)")
a("--resume", action="store_true", help="continue from the latest checkpoint in --out; ends with exactly the "
  "weights of an uninterrupted run")
a("--log-every", type=int, default=1, help="write a line to --out/log.jsonl every K steps")
a("--stop-after-step", type=int, default=None, help=argparse.SUPPRESS)  # testing: save at step K, then exit
a("--inject-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)  # testing: make step K's loss NaN
args = p.parse_args()

# ----------------------------------------------------------------------------------------------------- processes
# Under torchrun every process runs this file; RANK/LOCAL_RANK/WORLD_SIZE come from the environment (nanoGPT).
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
else:
    rank, local_rank, world = 0, 0, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
master = rank == 0  # only the master process logs and writes files
device_type = "cuda" if device.startswith("cuda") else "cpu"


def print0(*msg):
    if master:
        print(*msg, flush=True)


def barrier():
    if ddp:
        dist.barrier()


def fail(message):
    """Stop every process with a clear message (all ranks reach this together: the checked values are all-reduced)."""
    if master:
        print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    if ddp:
        dist.destroy_process_group()
    sys.exit(1)


# ----------------------------------------------------------------------------------------------------- settings
if args.model is None or args.data is None:
    if local_rank == 0:
        ensure_world(DEMO_WORLD)  # once per node; ensure_world is atomic, the other ranks wait
    barrier()
    demo = ensure_world(DEMO_WORLD)
    args.train = args.train or ("full" if args.model is None else "lora")
    args.model = args.model or demo["checkpoint"]
    args.data = args.data or demo["train"]
args.train = args.train or "lora"
args.model, args.data = os.path.abspath(args.model), os.path.abspath(args.data)
args.lr = DEFAULT_LR[args.objective] if args.lr is None else args.lr
args.out = args.out or os.path.join("out", args.objective)
args.world_size = world
args.global_batch = args.micro_batch * world * args.grad_accum
records = load_training_data(args.data)
if args.steps is not None and args.epochs is not None:
    p.error("give --steps or --epochs, not both")
if args.epochs is not None:
    args.steps = math.ceil(args.epochs * len(records) / args.global_batch)
args.steps = DEFAULT_STEPS[args.objective] if args.steps is None else args.steps
args.warmup_steps = round(0.05 * args.steps) if args.warmup_steps is None else args.warmup_steps
for name in ("steps", "micro_batch", "grad_accum", "save_every", "log_every", "max_length"):
    if getattr(args, name) < 1:
        p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported())
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
torch.manual_seed(args.seed + rank)  # LoRA dropout masks differ per rank; everything else is seeded explicitly
random.seed(args.seed + rank)
np.random.seed(args.seed + rank)

# ----------------------------------------------------------------------------------------------------- model
lora_on = args.train != "full"
# With LoRA only, the frozen base can stay in bf16 (half the memory); anything that trains is kept in fp32.
base_dtype = torch.bfloat16 if use_bf16 and args.train == "lora" else torch.float32
model = Qwen25VL.from_pretrained(args.model, dtype=base_dtype)
processor = Processor.from_pretrained(args.model, max_pixels=args.max_pixels)
yes_no = [processor.token_id("yes"), processor.token_id("no")]
if lora_on:
    inject_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                args.vision_lora_targets, seed=args.seed)
    for q in lora_parameters(model):
        q.data = q.data.float()  # adapters train in fp32 even over a bf16 base (LoRALinear casts its input)
    n_trainable = mark_only_lora_trainable(model, TRAIN_MODES[args.train])
else:
    n_trainable = sum(q.numel() for q in model.parameters())
    model.requires_grad_(True)
model.text.gradient_checkpointing = model.vision.gradient_checkpointing = args.grad_checkpointing
# DPO's reference policy: the starting model. With LoRA only it is the same model with the adapters switched off
# (no second copy); when base weights train too, a frozen copy taken now, before any update or --resume load.
reference = None
if args.objective == "dpo" and args.train != "lora":
    reference = copy.deepcopy(model).requires_grad_(False).eval().to(device)
lora_ids = {id(q) for q in lora_parameters(model)} if lora_on else set()
trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
print0(f"model {args.model}: {sum(q.numel() for q in model.parameters()):,} parameters, {n_trainable:,} trainable "
       f"(--train {args.train}); {world} process(es) on {device}, {'bf16 autocast' if use_bf16 else 'fp32'}")


class YesNoScorer(nn.Module):
    """What DDP wraps (DDP only syncs through forward): groups -> [z_yes, z_no] (G*(1+N), 2) in fp32 at the last
    position of every (instruction, query, document) prompt, and the prompt lengths."""

    def __init__(self, model, yes_no_ids):
        super().__init__()
        self.model, self.yes_no_ids = model, yes_no_ids

    def forward(self, groups):
        chats = [(r.instruction, r.query.as_input(), [d.as_input() for d in (pos, *negs)])
                 for r, pos, negs in groups]
        try:
            return group_logits(self.model, processor, chats, self.yes_no_ids, max_length=args.max_length,
                                return_lengths=True)
        except PromptTooLong as e:
            raise ValueError(f"{args.data}: record {groups[e.group][0].id!r}: a prompt has {e.length} tokens > "
                             f"--max-length {args.max_length}; minigmr never truncates (that would cut image tokens "
                             "or the answer position). Raise --max-length or lower --max-pixels") from None


# ----------------------------------------------------------------------------------------------------- data
# Random negatives come from the documents of the records that share the query's instruction, i.e. the same task:
# drawn from a mixed multi-task corpus, most of them would have another modality (an image for a query that asks
# for passages), which teaches only a modality shortcut that no evaluation candidate list rewards.
by_instruction = {}
for r in records:
    by_instruction.setdefault(r.instruction, []).append(r)
samplers = {ins: NegativeSampler(rs, args.negatives, args.hard_ratio, seed=args.seed)
            for ins, rs in by_instruction.items()}


def seeded(*key):
    """A torch.Generator seeded by a hash of key: seeded(seed, "negatives", step) gives every rank, and a resumed
    run, the same stream without saving any generator state."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=2)
def epoch_order(epoch):
    return torch.randperm(len(records), generator=seeded(args.seed, "order", epoch)).tolist()


def global_batch(step):
    """The global_batch groups (record, positive, [N negatives]) of 0-based optimizer step `step`: records in a
    fresh seeded permutation every epoch, negatives from a generator seeded by (seed, step)."""
    rng, groups = seeded(args.seed, "negatives", step), []
    for k in range(step * args.global_batch, (step + 1) * args.global_batch):
        epoch, i = divmod(k, len(records))
        record = records[epoch_order(epoch)[i]]
        groups.append((record, *samplers[record.instruction].sample(record, rng)))
    return groups


def objective(z, z_ref):
    """The loss (fp32 scalar, mean over groups) and its detached per-document weights W (G, 1+N) for the log."""
    o = args.objective
    if o == "sft":
        return losses.sft_loss(z), losses.sft_weight_direction(z)[0]
    if o == "infonce":
        return losses.infonce_loss(z, args.temperature), losses.cl_weight_direction(z, args.temperature)[0]
    if o == "dpo":
        return (losses.dpo_loss(z, z_ref, args.beta, args.label_smoothing),
                losses.dpo_weight_direction(z, z_ref, args.beta, args.label_smoothing)[0])
    return (losses.url_loss(z, args.weight, args.direction, args.tau, args.temperature),
            losses.url_weights(z, args.weight, args.tau, args.temperature))


# ----------------------------------------------------------------------------------------------------- checkpoints
def save(step):
    """Checkpoint (minigmr/trainer.py: atomic, older ones deleted) with every process's RNG state."""
    states = [None] * world
    if ddp:
        dist.all_gather_object(states, trainer.rng_state())  # LoRA dropout masks differ per rank
    else:
        states[0] = trainer.rng_state()
    if master:
        trainer.save_checkpoint(args.out, step, model, optimizer, lora_ids, vars(args), states)
    barrier()
    return os.path.join(args.out, f"step-{step:06d}")


# ----------------------------------------------------------------------------------------------------- optimizer
def lr_at(it):
    """Learning rate of 0-based step `it`: linear warm-up, then cosine / linear decay to 0, or constant."""
    if it < args.warmup_steps:
        return args.lr * (it + 1) / (args.warmup_steps + 1)
    progress = (it - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (1 - progress) if args.schedule == "linear" else args.lr


model.to(device)
params = [q for _, q in trainable]
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
os.makedirs(args.out, exist_ok=True)
log_path, start = os.path.join(args.out, "log.jsonl"), 0
last_saved = trainer.checkpoints(args.out)[-1] if trainer.checkpoints(args.out) else None
if args.resume:
    if last_saved is None:
        fail(f"--resume: no checkpoint (step-NNNNNN folder) in {args.out}")
    state = trainer.read_state(last_saved)
    # settings that change the trajectory must match; how the global batch is split over processes need not
    free = {"resume", "stop_after_step", "inject_nan_at_step", "save_every", "log_every", "out", "micro_batch",
            "grad_accum", "world_size", "grad_checkpointing"}
    changed = {k: (v, vars(args).get(k)) for k, v in state["args"].items() if k not in free and vars(args).get(k) != v}
    if changed:
        fail(f"--resume from {last_saved}: settings differ from the checkpoint's (saved, now): {changed}; "
             "use a new --out to train with other settings")
    trainer.load_checkpoint(last_saved, model, optimizer, lora_ids)
    if state["args"]["world_size"] == world:
        trainer.set_rng_state(state["rng"][rank])
    else:
        print0(f"--resume: {state['args']['world_size']} -> {world} processes: RNG states not restored (only LoRA "
               "dropout uses them)")
    start = state["step"]
    print0(f"resumed from {last_saved} (step {start})")
elif last_saved is not None:
    fail(f"{args.out} already holds checkpoints ({last_saved}); pass --resume or choose another --out")
if master:  # keep the log lines of the steps the checkpoint contains, drop any written after it
    kept = []
    if args.resume and os.path.exists(log_path):
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= start]
    with open(log_path, "w") as f:
        f.writelines(kept)
scorer = YesNoScorer(model, yes_no)
# Vision weights get no gradient from a text-only micro-batch, so DDP must look for unused parameters then; the
# model checkpoints layers with use_reentrant=False, which is what makes this safe with gradient checkpointing.
find_unused = any(n.startswith("vision.") for n, _ in trainable)
ddp_scorer = DDP(scorer, device_ids=[local_rank] if device_type == "cuda" else None,
                 find_unused_parameters=find_unused) if ddp else scorer
ref_scorer = YesNoScorer(reference, yes_no) if reference is not None else None

# ----------------------------------------------------------------------------------------------------- training
print0(f"{len(records):,} records, {args.negatives} negatives, global batch {args.global_batch} groups "
       f"({args.micro_batch} x {world} processes x {args.grad_accum} accumulation), {args.steps} steps")
model.train()
G, N1 = args.micro_batch, 1 + args.negatives
bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=not master, desc=args.objective)
for step in bar:
    t0 = time.time()
    lr = lr_at(step - 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    groups = global_batch(0 if args.overfit_one_batch else step - 1)
    mine = groups[rank * G * args.grad_accum:(rank + 1) * G * args.grad_accum]  # this rank's slice
    stats = torch.zeros(7, dtype=torch.float64)  # loss*G, sft_loss*G, groups, W+ sum, W- sum, negatives, tokens
    for micro in range(args.grad_accum):
        batch = mine[micro * G:(micro + 1) * G]
        last = micro == args.grad_accum - 1
        # all-reduce the gradients only on the last micro-step (nanoGPT); before that they just accumulate
        with ddp_scorer.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast:
                z, lengths = ddp_scorer(batch)
                z = z.reshape(G, N1, 2)  # (G*(1+N), 2) -> (G, 1+N, 2)
            n_tokens = sum(lengths)
            z_ref = None
            if args.objective == "dpo":
                with torch.no_grad(), autocast:
                    if reference is None:
                        with disable_adapters(model):
                            z_ref = scorer(batch)[0].reshape(G, N1, 2)
                    else:
                        z_ref = ref_scorer(batch)[0].reshape(G, N1, 2)
            loss, w = objective(z, z_ref)
            if args.inject_nan_at_step == step:
                loss = loss * float("nan")
            (loss / args.grad_accum).backward()  # DDP averages over processes: the gradient of the global mean
        with torch.no_grad():
            sft = losses.sft_loss(z.detach())  # one loss every objective is comparable on
        stats += torch.tensor([loss.item() * G, sft.item() * G, G, w[:, 0].sum().item(), w[:, 1:].sum().item(),
                               w[:, 1:].numel(), n_tokens], dtype=torch.float64)
    if ddp:
        dist.all_reduce(stats)
    loss_value = stats[0].item() / stats[2].item()
    if not math.isfinite(loss_value):
        fail(f"step {step}: non-finite loss {loss_value} (check: {args.objective} loss of the global batch, before "
             f"the optimizer step). Nothing was updated or saved for this step; last good checkpoint: "
             f"{last_saved or 'none (no checkpoint was written yet)'}")
    for q in params:  # a weight unused by every micro-batch gets an explicit zero gradient, as DDP gives it,
        if q.grad is None:  # so that AdamW treats 1 process and N processes alike (and its moments decay)
            q.grad = torch.zeros_like(q)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
    if not math.isfinite(grad_norm):
        fail(f"step {step}: non-finite gradient norm {grad_norm} with finite loss {loss_value:.6g} (check: global "
             f"gradient norm, before the optimizer step). Nothing was updated or saved for this step; last good "
             f"checkpoint: {last_saved or 'none (no checkpoint was written yet)'}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dt = time.time() - t0
    if master and step % args.log_every == 0:
        n = stats[5].item()
        line = {"step": step, "loss": loss_value, "sft_loss": stats[1].item() / stats[2].item(),
                "w_pos": stats[3].item() / stats[2].item(), "w_neg": stats[4].item() / n if n else float("nan"),
                "lr": lr, "grad_norm": grad_norm, "groups_per_s": args.global_batch / dt,
                "tokens_per_s": stats[6].item() / dt}
        with open(log_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        bar.set_postfix(loss=f"{loss_value:.4f}", w_pos=f"{line['w_pos']:.3f}", lr=f"{lr:.2e}")
    if step % args.save_every == 0 or step == args.steps or step == args.stop_after_step:
        last_saved = save(step)
    if step == args.stop_after_step:
        print0(f"stopped after step {step} (--stop-after-step); continue with --resume")
        break
bar.close()

if args.stop_after_step is None or args.stop_after_step >= args.steps:
    if master:
        # InfoNCE (and the unified loss with the CL direction) only shapes z_yes: such a model ranks by z_yes
        score = "cl" if args.objective == "infonce" or (args.objective == "url" and args.direction == "cl") else "sft"
        print0(f"merged model written to {trainer.export_merged(model, args.out, args.model, score)} "
               f"(read with the {score} score)")
    barrier()
if ddp:
    dist.destroy_process_group()
