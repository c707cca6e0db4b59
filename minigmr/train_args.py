"""train.py's command line: every flag with its help string and default, and the checks that run before any work
(ranges and finiteness, a flag the chosen --objective / --train mode does not read, --steps vs --epochs, --out).

parse_args reads the flags; flag_problems lists what is wrong with them, for train.py to report as
`train.py: error: ...` once its processes are up (the seed range depends on the world size); fill_step_defaults
sets --steps / --warmup-steps once the training records are counted.
"""
import argparse
import math
import os

from .lora import TEXT_TARGETS, VISION_TARGETS

# Peak lr of the tiny demo, every objective: the best of the values tried (docs/experiments.md, train.py entries).
DEMO_LR = 5e-4
# Default --steps: the demo within minutes on a CPU (fewer for DPO, whose reference forward makes a step dearer).
DEFAULT_STEPS = {"sft": 2000, "infonce": 2000, "dpo": 1500, "url": 2000, "embed": 400}
# What each --train mode trains besides the LoRA adapters (mark_only_lora_trainable's also_train prefixes).
TRAIN_MODES = {"lora": (), "lora+projector": ("vision.merger.",), "lora+vision": ("vision.",), "full": None}
# How each objective's logged "loss" reduces over the global batch (losses.py), written into every log line.
LOSS_REDUCTION = {"sft": "sum over each group's 1+N documents, mean over groups",
                  "infonce": "one (1+N)-way cross-entropy per group, mean over groups",
                  "dpo": "sum over each group's 1+N documents, mean over groups",
                  "url": "a surrogate, only its gradient means something; sft_loss: sum over each group's 1+N "
                         "documents, mean over groups",
                  "embed": "contrastive mean over queries + lm_weight x next-token mean over description tokens"}


def build_parser(description=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Qwen2.5-VL checkpoint folder (config.json + safetensors + "
                        "tokenizer.json + preprocessor_config.json). Default: the synthetic data's tiny caption-"
                        "pretrained checkpoint in data/synth (generated if absent)")
    parser.add_argument("--data", default=None, help="training JSONL (format: minigmr/train_data.py). Default: the "
                        "synthetic data's")
    parser.add_argument("--objective", default="sft", choices=["sft", "infonce", "dpo", "url", "embed"],
                        help="sft: yes/no cross-entropy per document (GMR's choice); infonce: softmax over the "
                        "group's yes logits; dpo: yes-vs-no preference against the starting model; url: unified "
                        "reranking loss, any --weight with any --direction (docs/gmr.md §2.3); embed: a first-stage embedder "
                        "(minigmr/embedding.py): InfoNCE over the batch's cosine similarities + the next-token loss on "
                        "the records' descriptions (VladVA, docs/gmr.md §8)")
    parser.add_argument("--embed-temperature", type=float, default=0.05,
                        help="embed only: temperature of the contrastive loss over cosine similarities")
    parser.add_argument("--cl-weight", type=float, default=1.0, help="embed only: weight of the contrastive term")
    parser.add_argument("--lm-weight", type=float, default=1.0, help="embed only: weight of the next-token term "
                        "on the records' 'description' texts (records without one add nothing; 0: off)")
    parser.add_argument("--weight", default="sft", choices=["sft", "cl", "ones"],
                        help="url only: weight source W (docs/gmr.md §2.2)")
    parser.add_argument("--direction", default="sft", choices=["sft", "cl"],
                        help="url only: direction source D (docs/gmr.md §2.2)")
    parser.add_argument("--tau", type=float, default=None, help="url only: zero the weight of documents already "
                        "learned (positive p(yes) > 1-tau, negative p(yes) < tau), the paper's tau-mask (Table 2)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="InfoNCE temperature (also url with --weight cl); the paper reports none, i.e. 1")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta (Rafailov et al. and PIVOT: 0.1)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="DPO conservative label smoothing, 0..0.5")
    parser.add_argument("--train", default=None, choices=list(TRAIN_MODES), help="what trains. lora: the LoRA "
                        "adapters (the paper); lora+projector: + the patch merger; lora+vision: + the vision tower "
                        "(as PIVOT); full: every weight, no LoRA. Default: full for the tiny demo model, lora with "
                        "--model")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (the paper: 16)")
    parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha; scaling = alpha / r")
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="dropout on the LoRA input (0: deterministic)")
    parser.add_argument("--lora-targets", nargs="+", default=list(TEXT_TARGETS), choices=TEXT_TARGETS,
                        help="text decoder projections that get LoRA (default: all seven)")
    parser.add_argument("--vision-lora-targets", nargs="*", default=[], choices=VISION_TARGETS,
                        help="vision tower projections that get LoRA (default: none)")
    parser.add_argument("--negatives", type=int, default=2,
                        help="negatives N per query (paper: 16; its analysis runs: 4; 2 keeps the CPU demo short)")
    parser.add_argument("--hard-ratio", type=float, default=0.5, help="share of the N negatives drawn from the "
                        "record's hard negatives, the rest from the same instruction's records; 0.5 = the paper's 1:1")
    parser.add_argument("--lr", type=float, default=DEMO_LR, help=f"peak learning rate (AdamW). Default: {DEMO_LR}, "
                        "for the tiny demo; the paper uses 1e-4 with LoRA on 3B/7B")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"],
                        help="lr schedule after warm-up (cosine and linear decay to 0 at the last step)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up steps. Default: 5%% of the steps")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps. Default unless --epochs is given: {DEFAULT_STEPS} (the tiny demo)")
    parser.add_argument("--epochs", type=float, default=None, help="passes over the records, instead of --steps")
    parser.add_argument("--micro-batch", type=int, default=4, help="groups (of 1+N prompts) per forward per process")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-steps per optimizer step per process; "
                        "global batch = micro_batch x world_size x grad_accum groups")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in backward (less memory)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="compute dtype. auto: "
                        "bf16 autocast on a GPU that supports it, else fp32 (bf16 matmuls are very slow on a CPU). "
                        "Losses, scores and trained weights are always fp32")
    parser.add_argument("--max-pixels", type=int, default=None, help="cap on image pixels (tokens = pixels / 784). "
                        "Default: the checkpoint's preprocessor_config.json")
    parser.add_argument("--max-length", type=int, default=3200, help="longest allowed prompt in tokens (paper: "
                        "3200). Longer prompts stop training with an error naming the record: minigmr never truncates")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global gradient norm to this (0: "
                        "no clipping)")
    parser.add_argument("--overfit-one-batch", action="store_true",
                        help="debugging: train on the first global batch at every step; the loss must go towards 0")
    parser.add_argument("--seed", type=int, default=0, help="seed for LoRA init, data order and negative sampling")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: "
                        "OMP_NUM_THREADS if set, else this process's share of the cores not busy with other work)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/<objective>)")
    parser.add_argument("--save-every", type=int, default=100, help="save a checkpoint every K steps and at the end")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out, bit-exactly as an uninterrupted run")
    parser.add_argument("--log-every", type=int, default=1, help="write a line to --out/log.jsonl every K steps")
    parser.add_argument("--eval-every", type=int, default=0, help="every K steps (and at the last) rerank a small "
                        "held-out slice (minigmr/validation.py) and log its main metric as val_<metric> (0: never)")
    parser.add_argument("--eval-suite", default=None, help="--eval-every: the suite folder of that slice (default: "
                        "the synthetic world's suite; a learning curve, not a model selector)")
    parser.add_argument("--eval-queries", type=int, default=4, help="--eval-every: the first K queries of each dataset")
    parser.add_argument("--eval-depth", type=int, default=30,
                        help="--eval-every: rerank each query's first-stage top K candidates")
    return parser


def parse_args(argv=None, description=None):
    """-> (args, given): the flags with --train and --out defaulted, and the names of the flags given on the command
    line (not defaulted). argparse's own errors (unknown flag, bad choice or type) exit with status 2."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    # Parsed again into a namespace that already has every name, argparse fills in no default: what is left unset
    # was not given. Only a given flag that the run would not read is an error (flag_problems).
    unset = object()
    again = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    given = {name for name, value in vars(again).items() if value is not unset}
    args.train = args.train or ("full" if args.model is None else "lora")
    args.out = args.out or os.path.join("runs", args.objective)
    return args, given


def flag_problems(args, given, world_size):
    """What is wrong with the flags, one message per problem naming the flag (empty: nothing)."""
    # What each numeric flag must be (a float flag also finite: nan and inf are refused); None = its default.
    ranges = {"lr": (lambda v: v > 0, "> 0"), "weight_decay": (lambda v: v >= 0, ">= 0"),
              "max_grad_norm": (lambda v: v >= 0, ">= 0 (0: no clipping)"), "temperature": (lambda v: v > 0, "> 0"),
              "beta": (lambda v: v > 0, "> 0"), "label_smoothing": (lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
              "embed_temperature": (lambda v: v > 0, "> 0"),
              "cl_weight": (lambda v: v >= 0, ">= 0"), "lm_weight": (lambda v: v >= 0, ">= 0"),
              "tau": (lambda v: 0 <= v <= 1, "in [0, 1] (a probability threshold)"),
              "lora_rank": (lambda v: v >= 1, ">= 1"), "lora_alpha": (lambda v: v > 0, "> 0 (scaling = alpha / r)"),
              "threads": (lambda v: v >= 1, ">= 1"), "eval_every": (lambda v: v >= 0, ">= 0 (0: never)"),
              "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
              "negatives": (lambda v: v >= 1, ">= 1 (a group ranks its positive against negatives)"),
              "hard_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"), "epochs": (lambda v: v > 0, "> 0"),
              "warmup_steps": (lambda v: v >= 0, ">= 0"), "max_pixels": (lambda v: v > 0, "> 0"),
              "seed": (lambda v: 0 <= v <= 2 ** 32 - world_size, f"in 0..{2 ** 32 - world_size} (numpy seeds process "
                       "r with seed + r)"),
              **{name: (lambda v: v >= 1, ">= 1") for name in ("steps", "micro_batch", "grad_accum", "save_every",
                                                                "log_every", "max_length", "eval_queries",
                                                                "eval_depth")}}
    # Flags that only some objectives / --train modes read: {flag: (which runs read it, does this run)}.
    lora_read = ("--train lora, lora+projector or lora+vision", args.train != "full")
    read_by = {"temperature": ("--objective infonce, or url with --weight cl",
                               args.objective == "infonce" or (args.objective == "url" and args.weight == "cl")),
               **dict.fromkeys(("beta", "label_smoothing"), ("--objective dpo", args.objective == "dpo")),
               **dict.fromkeys(("tau", "weight", "direction"), ("--objective url", args.objective == "url")),
               **dict.fromkeys(("embed_temperature", "cl_weight", "lm_weight"),
                               ("--objective embed", args.objective == "embed")),
               **dict.fromkeys(("eval_suite", "eval_queries", "eval_depth"), ("--eval-every K > 0",
                                                                              args.eval_every > 0)),
               "eval_every": ("a reranking --objective (not embed)", args.objective != "embed"),
               **dict.fromkeys(("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "vision_lora_targets"),
                               lora_read)}
    problems = []
    for name, (ok, what) in ranges.items():
        value = getattr(args, name)
        if value is not None and not (ok(value) and math.isfinite(value)):
            kind = "a finite number " if isinstance(value, float) else ""
            problems.append(f"--{name.replace('_', '-')} {value}: must be {kind}{what}")
    for name, (where, read) in read_by.items():
        if name in given and not read:
            problems.append(f"--{name.replace('_', '-')} is not read with --objective {args.objective} --train "
                            f"{args.train}, only with {where}; leave it out")
    if args.eval_every > 0 and args.data is not None and args.eval_suite is None:
        problems.append("--eval-every with --data needs --eval-suite (the default is the synthetic world's suite)")
    if args.objective == "embed" and args.cl_weight == 0 and args.lm_weight == 0:
        problems.append("--cl-weight 0 and --lm-weight 0: the embed objective would train on nothing")
    if args.steps is not None and args.epochs is not None:
        problems.append("give --steps or --epochs, not both")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        problems.append(f"--out {args.out}: exists and is not a folder")
    return problems


def fill_step_defaults(args, n_records):
    """--steps from --epochs (else the demo's DEFAULT_STEPS) and --warmup-steps (5% of the steps), once the
    training records are counted; args.global_batch must be set."""
    if args.epochs is not None:
        args.steps = math.ceil(args.epochs * n_records / args.global_batch)
    args.steps = DEFAULT_STEPS[args.objective] if args.steps is None else args.steps
    args.warmup_steps = round(0.05 * args.steps) if args.warmup_steps is None else args.warmup_steps


def lr_at(args, it: int) -> float:
    """Learning rate of 0-based step `it`: linear warm-up, then cosine / linear decay to 0, or constant."""
    if it < args.warmup_steps:
        return args.lr * (it + 1) / (args.warmup_steps + 1)
    progress = (it - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * (1 - progress) if args.schedule == "linear" else args.lr


def model_score(args) -> str:
    """The score the trained model ranks by: InfoNCE (and url with the CL direction) only shapes z_yes, so "cl"
    (z_yes); every other reranking objective "sft" (p(yes))."""
    return "cl" if args.objective == "infonce" or (args.objective == "url" and args.direction == "cl") else "sft"
