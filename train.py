"""Train a GMR reranker (Qwen2.5-VL answering "yes"/"no" to "does this document fit the query?") with SFT,
InfoNCE, DPO or the unified reranking loss (docs/gmr.md §2, §6), or with --objective embed the first-stage embedder
of minigmr/embedding.py (VladVA, docs/gmr.md §8). One file, read top to bottom, nanoGPT style.

To run on one process (CPU or one GPU), e.g. the tiny synthetic demo (its world is generated on first use):
$ python train.py --objective sft

To run with DDP on 8 GPUs of one node, e.g. the paper's recipe (LoRA r=16, lr 1e-4, 16 negatives, docs/gmr.md §3):
$ torchrun --standalone --nproc_per_node 8 train.py --model Qwen2.5-VL-7B-Instruct --data train.jsonl \
      --train lora --negatives 16 --lr 1e-4 --micro-batch 1 --grad-accum 4 --epochs 1 --grad-checkpointing

To run with DDP on 2 nodes of 8 GPUs each, on node 0 (the master, example IP 123.456.123.456) and node 1:
$ torchrun --nnodes 2 --node_rank 0 --master_addr 123.456.123.456 --master_port 29500 --nproc_per_node 8 train.py ...
$ torchrun --nnodes 2 --node_rank 1 --master_addr 123.456.123.456 --master_port 29500 --nproc_per_node 8 train.py ...

One optimizer step sees a global batch of micro_batch x world_size x grad_accum groups; a group is one
(instruction, query) with its positive and N negatives, i.e. 1+N prompts. The global batch of step k is a pure
function of (--seed, k) (minigmr/train_data.py GlobalBatches), drawn identically on every rank; each rank takes its
slice. So 1 process with the same global batch computes the same gradient (up to float summation order), and
--resume continues bit-exactly.

Per micro-batch of G groups, scoring.group_logits runs each group's shared prefix (system + instruction + query,
incl. its image) once, then its 1+N documents on the prefix keys/values, the vision tower once per distinct image
-> [z_yes, z_no] = h @ [M_yes; M_no]^T at the last position, (G, 1+N, 2) in fp32 -> the loss (losses.py): the maths
of 1+N full prompts (tested) for less work, and the (B, S, vocab) logits are never built.

DPO (losses.dpo_loss): the chosen answer is "yes" for the positive, "no" for a negative; the reference policy is the
starting model (with LoRA only: the same weights, adapters off). From the demo checkpoint, never asked yes/no, DPO is
SFT with a weight beta * (1 - sigmoid(beta * margin)) that fades ~1/beta logits away (losses.dpo_weight_direction).

Outputs in --out (layout in minigmr/train_state.py): log.jsonl (a line per logged step: losses and how they reduce,
mean W+ / W-, lr, gradient norm, speed, elapsed training time, --eval-every's held-out metric), step-NNNNNN/ (the latest
checkpoint: adapter/ in peft format, trainable.safetensors for trained non-LoRA weights under their official names,
the optimizer state, RNG states and settings; safetensors and JSON only, so --resume never unpickles) and merged/
(the trained model in the official Qwen2.5-VL layout with the processor files: loads in eval.py --model,
Qwen25VL.from_pretrained, transformers and, for a reranker, sentence-transformers' CrossEncoder).

Bad input stops before any work where it can (flags, data, checkpoint, --resume, --eval-suite), with `train.py:
error:` and a message naming the flag, file, line or record; a given flag the run would not read is an error. A non-finite loss, gradient norm or trained weight stops training before anything of that step
is saved, naming the last good checkpoint.

Test hooks (tests/test_train.py), environment variables rather than options: MINIGMR_TEST_STOP_AFTER_STEP=K saves
step K and exits as if interrupted; MINIGMR_TEST_INJECT_NAN_AT_STEP=K makes step K's loss NaN;
MINIGMR_TEST_INJECT_NAN_WEIGHT_AT_STEP=K makes a trained weight NaN in step K's update.
"""
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from minigmr import losses, train_state
from minigmr.embedding import GroupEmbedder, mark_embedder
from minigmr.hardware import reuse_freed_memory, set_threads
from minigmr.lora import disable_adapters, inject_lora, lora_parameters, mark_only_lora_trainable
from minigmr.model import Qwen25VL
from minigmr.processor import ImageProcessor, Processor
from minigmr.scoring import PromptTooLong, group_logits
from minigmr.st_export import write_sentence_transformers_files
from minigmr.synth import ensure_world
from minigmr.train_args import LOSS_REDUCTION, TRAIN_MODES, fill_step_defaults, flag_problems, lr_at, model_score, \
    parse_args
from minigmr.train_data import GlobalBatches, load_training_data
from minigmr.validation import Validation

SYNTH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synth")
# The test hooks of the module docstring, read here and nowhere else.
STOP_AFTER_STEP = int(os.environ.get("MINIGMR_TEST_STOP_AFTER_STEP", 0)) or None
INJECT_NAN_AT_STEP = int(os.environ.get("MINIGMR_TEST_INJECT_NAN_AT_STEP", 0)) or None
INJECT_NAN_WEIGHT_AT_STEP = int(os.environ.get("MINIGMR_TEST_INJECT_NAN_WEIGHT_AT_STEP", 0)) or None

# ----------------------------------------------------------------------------------------------------- arguments
# The flags, their defaults and checks: minigmr/train_args.py. given: the flags given on the command line.
args, given = parse_args(description=__doc__)

# ----------------------------------------------------------------------------------------------------- processes
# Under torchrun every process runs this file; RANK/LOCAL_RANK/WORLD_SIZE come from the environment (nanoGPT).
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
else:
    rank, local_rank, world_size = 0, 0, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
master = rank == 0  # only the master process logs and writes files
device_type = "cuda" if device.startswith("cuda") else "cpu"


def print0(*msg):
    if master:
        print(*msg, flush=True)


def barrier():
    if ddp:
        dist.barrier()


def fail(message, all_ranks=True):
    """Stop with a clear message. all_ranks: every process reaches this call with the same message (the checked
    values are identical or all-reduced), and the master prints it; False: only this process found the problem."""
    if master or not all_ranks:
        tqdm.write(f"train.py: error: {message}", file=sys.stderr)  # on its own line, also under the progress bar
    if ddp:
        dist.destroy_process_group()
    sys.exit(1)


@contextlib.contextmanager
def reported(prefix=""):
    """Bad input that minigmr refuses (a ValueError or OSError whose message names the file, line, record or
    flag) -> `train.py: error: ...` and exit status 1, not a traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        fail(f"{prefix}{e}")


# ----------------------------------------------------------------------------------------------------- settings
if problems := flag_problems(args, given, world_size):  # every bad flag at once, before any work
    fail("\n  ".join(problems))
set_threads(args.threads)  # idle cores only: torch's spinning threads on a busy core are a cliff (hardware.py)
reuse_freed_memory()  # activations re-allocated every step come back without page faults (hardware.py)
if args.model is None or args.data is None:
    if local_rank == 0:
        ensure_world(SYNTH_DIR)  # once per node; ensure_world is atomic, the other ranks wait
    barrier()
    synth = ensure_world(SYNTH_DIR)
    args.model = args.model or synth["checkpoint"]
    args.data = args.data or synth["train"]
    args.eval_suite = args.eval_suite or (synth["suite"] if args.eval_every else None)
args.model, args.data = os.path.abspath(args.model), os.path.abspath(args.data)
score_type = model_score(args)  # how the trained model ranks: "cl" (z_yes) or "sft" (p(yes))
with reported("--eval-suite: "):  # read now: a bad suite stops before training; only the master uses it
    validation = Validation(args.eval_suite, args.eval_queries, args.eval_depth, score_type, args.max_length) \
        if args.eval_every else None
args.world_size, args.global_batch = world_size, args.micro_batch * world_size * args.grad_accum
G = args.micro_batch  # groups per micro-batch
with reported("--data: "):
    records = load_training_data(args.data)
    batches = GlobalBatches(records, args.global_batch, args.negatives, args.hard_ratio, args.seed)
fill_step_defaults(args, len(records))
# --resume: the checkpoint is checked (no pickle, every file there) and its settings compared before the model loads
last_saved = (train_state.checkpoints(args.out) or [None])[-1]
resumed = None
if args.resume:
    if last_saved is None:
        fail(f"--resume: no checkpoint (step-NNNNNN folder) in {args.out}")
    with reported("--resume: "):
        resumed = train_state.read_state(last_saved)
    changed = train_state.changed_settings(resumed["args"], vars(args))
    if changed:
        fail(f"--resume from {last_saved}: settings differ from the checkpoint's (saved, now): {changed}; "
             "use a new --out to train with other settings")
elif last_saved is not None:
    fail(f"{args.out} already holds checkpoints ({last_saved}); pass --resume or choose another --out")
use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported())
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
torch.manual_seed(args.seed + rank)  # LoRA dropout masks differ per rank; everything else is seeded explicitly
random.seed(args.seed + rank)
np.random.seed(args.seed + rank)

# ----------------------------------------------------------------------------------------------------- model
lora_on = args.train != "full"
# With LoRA only, the frozen base can stay in bf16 (half the memory); anything that trains is kept in fp32.
base_dtype = torch.bfloat16 if use_bf16 and args.train == "lora" else torch.float32
with reported():
    model = Qwen25VL.from_pretrained(args.model, dtype=base_dtype)
    train_state.storage_dtype(model.config, args.model)  # the merged export's dtype: checked now, not after training
    min_pixels = ImageProcessor.from_pretrained(args.model).min_pixels
    if args.max_pixels is not None and args.max_pixels < min_pixels:
        fail(f"--max-pixels {args.max_pixels}: below min_pixels {min_pixels} of {args.model}/preprocessor_config.json")
    processor = Processor.from_pretrained(args.model, max_pixels=args.max_pixels)
yes_no = [processor.token_id("yes"), processor.token_id("no")]
if lora_on:
    inject_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets,
                args.vision_lora_targets, seed=args.seed)
    for param in lora_parameters(model):
        param.data = param.data.float()  # adapters train in fp32 even over a bf16 base (LoRALinear casts its input)
    mark_only_lora_trainable(model, TRAIN_MODES[args.train])
else:
    model.requires_grad_(True)
model.text.gradient_checkpointing = model.vision.gradient_checkpointing = args.grad_checkpointing
# DPO's reference policy: the starting model. With LoRA only it is the same model with the adapters switched off
# (no second copy); when base weights train too, a frozen copy taken now, before any update or --resume load.
reference = None
if args.objective == "dpo" and args.train != "lora":
    reference = copy.deepcopy(model).requires_grad_(False).eval().to(device)
lora_ids = {id(param) for param in lora_parameters(model)} if lora_on else set()
trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
n_trainable = sum(param.numel() for param in trainable.values())
print0(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {n_trainable:,} trainable "
       f"(--train {args.train}); {world_size} process(es) on {device}, {'bf16 autocast' if use_bf16 else 'fp32'}")


class YesNoScorer(nn.Module):
    """What DDP wraps (DDP only syncs through forward): G TrainGroups -> [z_yes, z_no] (G, 1+N, 2) in fp32 at the
    last position of every (instruction, query, document) prompt, and the prompt lengths."""

    def __init__(self, model, yes_no_ids, trained_vision=()):
        super().__init__()
        self.model, self.yes_no_ids, self.trained_vision = model, yes_no_ids, list(trained_vision)

    def forward(self, groups):
        chats = [(g.record.instruction, g.record.query.as_input(),
                  [d.as_input() for d in (g.positive, *g.negatives)]) for g in groups]
        try:
            z, lengths = group_logits(self.model, processor, chats, self.yes_no_ids, max_length=args.max_length,
                                      return_lengths=True)
        except PromptTooLong as e:
            fail(f"{args.data}: record {groups[e.group].record.id!r}: a prompt has {e.length} tokens > --max-length "
                 f"{args.max_length}; minigmr never truncates (that would cut image tokens or the answer position). "
                 "Raise --max-length or lower --max-pixels", all_ranks=False)
        if self.trained_vision and not any("image" in x for _, query, docs in chats for x in (query, *docs)):
            # A text-only micro-batch never runs the vision tower: tie its trained weights in with weight 0, so that
            # every trained weight is in every graph (an exact zero gradient, no find_unused_parameters for DDP).
            z = z + 0.0 * sum(param.sum() for param in self.trained_vision)
        return z.reshape(len(groups), -1, 2), lengths  # (G*(1+N), 2) -> (G, 1+N, 2)


def objective(z, z_ref):
    """The loss (fp32 scalar, mean over groups) and its detached per-document weights W (G, 1+N) for the log."""
    o = args.objective
    if o == "embed":  # z = GroupEmbedder's (q, d, positive, exclude, lm); W is logged with the positive first
        q, d, positive, exclude, lm = z
        loss = args.cl_weight * losses.embedding_infonce_loss(q, d, positive, args.embed_temperature, exclude)
        if lm is not None:
            loss = loss + args.lm_weight * losses.next_token_loss(*lm)
        w = losses.embedding_weight_direction(q, d, positive, args.embed_temperature, exclude)[0]  # (G, M)
        is_pos = torch.zeros_like(w, dtype=torch.bool).scatter_(1, positive[:, None], True)
        return loss, torch.cat([w[is_pos][:, None], w[~is_pos].view(len(w), -1)], dim=1)  # (G, M)
    if o == "sft":
        return losses.sft_loss(z), losses.sft_weight_direction(z)[0]
    if o == "infonce":
        return losses.infonce_loss(z, args.temperature), losses.cl_weight_direction(z, args.temperature)[0]
    if o == "dpo":
        return (losses.dpo_loss(z, z_ref, args.beta, args.label_smoothing),
                losses.dpo_weight_direction(z, z_ref, args.beta, args.label_smoothing)[0])
    return (losses.url_loss(z, args.weight, args.direction, args.tau, args.temperature),
            losses.url_weights(z, args.weight, args.tau, args.temperature))


def all_reduce_sum(totals):
    """{name: float} summed over the processes, in one all-reduce (on the device: nccl reduces only GPU tensors)."""
    if not ddp:
        return totals
    buf = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return dict(zip(totals, buf.tolist()))


# ----------------------------------------------------------------------------------------------------- checkpoints
def save(step):
    """Checkpoint (minigmr/train_state.py: atomic, older ones deleted) with every process's RNG state (LoRA dropout
    masks differ per rank)."""
    states = train_state.all_rng_states(device)
    if master:
        train_state.save_checkpoint(args.out, step, model, optimizer, lora_ids, vars(args), states)
    barrier()
    return os.path.join(args.out, f"step-{step:06d}")


# ----------------------------------------------------------------------------------------------------- optimizer
model.to(device)
params = list(trainable.values())
optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
os.makedirs(args.out, exist_ok=True)
log_path, start = os.path.join(args.out, "log.jsonl"), 0
if resumed is not None:
    with reported("--resume: "):
        train_state.load_checkpoint(last_saved, model, optimizer, lora_ids)
        if resumed["args"]["world_size"] == world_size:
            train_state.set_rng_state(last_saved, rank)
        else:
            print0(f"--resume: {resumed['args']['world_size']} -> {world_size} processes: RNG states not restored "
                   "(only LoRA dropout uses them)")
    start = resumed["step"]
    print0(f"resumed from {last_saved} (step {start})")
with reported("--resume: "):
    kept, torn = train_state.read_log(log_path, start)  # every process checks the log, the master rewrites it
elapsed = json.loads(kept[-1]).get("elapsed_s", 0.0) if kept else 0.0  # wall time of the steps already done
if torn and master:
    print(f"train.py: warning: {torn}", file=sys.stderr, flush=True)
barrier()
if master:
    with open(log_path, "w") as f:
        f.writelines(kept)
trained_vision = [param for name, param in trainable.items() if name.startswith("vision.")]
scorer = GroupEmbedder(model, processor, args.max_length, args.lm_weight > 0, trained_vision) \
    if args.objective == "embed" else YesNoScorer(model, yes_no, trained_vision)
ddp_scorer = DDP(scorer, device_ids=[local_rank] if device_type == "cuda" else None) if ddp else scorer
ref_scorer = YesNoScorer(model if reference is None else reference, yes_no)


def dpo_reference_logits(batch):
    """DPO's reference z (G, 1+N, 2): the frozen copy or, with LoRA only, the model with its adapters off."""
    with torch.no_grad(), autocast, disable_adapters(model) if reference is None else contextlib.nullcontext():
        return ref_scorer(batch)[0]


def check_finite(step, what, value, where):
    if not math.isfinite(value):
        fail(f"step {step}: non-finite {what} {value} (check: {where}, before the optimizer step). Nothing was "
             f"updated or saved for this step; last good checkpoint: {last_saved or 'none (none written yet)'}")


# ----------------------------------------------------------------------------------------------------- training
print0(f"{len(records):,} records, {args.negatives} negatives, global batch {args.global_batch} groups "
       f"({args.micro_batch} x {world_size} processes x {args.grad_accum} accumulation), {args.steps} steps")
model.train()
# url's loss value is a surrogate (only its gradient means something: losses.url_loss): show the SFT loss instead
shown = "sft_loss" if args.objective == "url" else "loss"
bar = tqdm(range(start + 1, args.steps + 1), initial=start, total=args.steps, disable=not master, desc=args.objective)
for step in bar:
    t0 = time.time()
    lr = lr_at(args, step - 1)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    with reported():
        groups = batches.at(0 if args.overfit_one_batch else step - 1)
    mine = groups[rank * G * args.grad_accum:(rank + 1) * G * args.grad_accum]  # this rank's slice
    totals = Counter()  # summed over micro-batches (Counter.update adds)
    for micro in range(args.grad_accum):
        batch = mine[micro * G:(micro + 1) * G]
        last = micro == args.grad_accum - 1
        # all-reduce the gradients only on the last micro-step (nanoGPT); before that they just accumulate
        with ddp_scorer.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast, reported(f"{args.data}: "):
                z, lengths = ddp_scorer(batch)
            loss, w = objective(z, dpo_reference_logits(batch) if args.objective == "dpo" else None)
            if INJECT_NAN_AT_STEP == step:
                loss = loss * float("nan")
            (loss / args.grad_accum).backward()  # DDP averages over processes: the gradient of the global mean
        # the SFT loss is logged for every reranking objective, the one value they are all comparable on (embed: its loss)
        sft = loss.item() if args.objective == "embed" else losses.sft_loss(z.detach()).item()
        totals.update({"loss": loss.item(), "sft_loss": sft, **losses.weight_stats(w), "tokens": sum(lengths)})
    totals = all_reduce_sum(totals)
    # every micro-batch holds G groups, so the mean of the micro-batch means is the mean over the global batch
    means = {k: totals[k] / (args.grad_accum * world_size) for k in ("loss", "sft_loss", "w_pos", "w_neg")}
    check_finite(step, "loss", means["loss"], f"{args.objective} loss of the global batch")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf")).item()
    check_finite(step, "gradient norm", grad_norm, f"global gradient norm, with finite loss {means['loss']:.6g}")
    try:
        optimizer.step()
    except RuntimeError as e:  # e.g. an lr whose step size overflows float32, or out of memory
        fail(f"step {step}: the optimizer step failed ({e}) at lr {lr:.6g}. Nothing was saved for this step; last "
             f"good checkpoint: {last_saved or 'none (none written yet)'}", all_ranks=False)
    optimizer.zero_grad(set_to_none=True)
    if INJECT_NAN_WEIGHT_AT_STEP == step:
        params[0].data[0] = float("nan")
    if not torch.stack([param.isfinite().all() for param in params]).all():  # one sync; never save such weights
        bad = [name for name, param in trainable.items() if not param.isfinite().all()]
        fail(f"step {step}: the optimizer step made {len(bad)} trained weight tensor(s) non-finite, e.g. {bad[:3]} "
             f"(loss {means['loss']:.6g}, gradient norm {grad_norm:.6g}, lr {lr:.6g}). Nothing was saved for this "
             f"step; last good checkpoint: {last_saved or 'none (none written yet)'}")
    dt = time.time() - t0
    elapsed += dt
    check = validation is not None and (step % args.eval_every == 0 or step == args.steps)
    if master and (step % args.log_every == 0 or check):
        line = {"step": step, **means, "loss_reduction": LOSS_REDUCTION[args.objective], "lr": lr,
                "grad_norm": grad_norm, "groups_per_s": args.global_batch / dt, "tokens_per_s": totals["tokens"] / dt,
                "elapsed_s": round(elapsed, 3)}  # training time only: the checks below are not counted
        if check:
            with autocast:
                line.update(validation(model, processor))
        train_state.append_log(log_path, line)
        bar.set_postfix({shown: f"{line[shown]:.4f}", "w_pos": f"{line['w_pos']:.3f}", "lr": f"{lr:.2e}"})
    if step % args.save_every == 0 or step == args.steps or step == STOP_AFTER_STEP:
        last_saved = save(step)
    if step == STOP_AFTER_STEP:
        print0(f"stopped after step {step} (MINIGMR_TEST_STOP_AFTER_STEP); continue with --resume")
        break
bar.close()

if STOP_AFTER_STEP is None or STOP_AFTER_STEP >= args.steps:
    if master:
        merged = train_state.export_merged(model, args.out, args.model, score_type)
        if args.objective == "embed":
            mark_embedder(merged)  # an embedder, not a reranker: eval.py --embedder reads it
        else:
            write_sentence_transformers_files(merged)  # CrossEncoder(merged) loads it too (st_export.py)
        print0(f"merged model written to {merged} " + ("(an embedder)" if args.objective == "embed" else
                                                       f"(read with the {score_type} score)"))
    barrier()
if ddp:
    dist.destroy_process_group()
