"""minigmr vs vLLM, the engine people serve rerankers with: same random checkpoint, same workloads, same dtype.

    python tools/bench_vllm.py --workloads W1 W3 --dtype bfloat16 --threads 1

Optional and never in CI: it needs `vllm` (setup in docs/experiments.md, *vLLM on a CPU*) and exits with a message
when it cannot import it. The checkpoint and the workloads are bench.py's (same seed, same data). vLLM scores a
yes/no reranker as a 2-way classifier over the "no" and "yes" rows of the head (`runner="pooling"`,
`convert="classify"`, `classifier_from_token`, `from_2_way_softmax`), which is p(yes), minigmr's SFT score.
Reported per workload: pairs/s (median of alternating repetitions, each after `--settle` idle seconds),
CPU-seconds per pair (vLLM's engine runs in a child process: the whole process tree is counted), and the score
agreement of vLLM's native Qwen2.5-VL and of its transformers backend with minigmr.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import bench  # noqa: E402  (the checkpoint writer and the workloads)
from minigmr.prompt import DEFAULT_INSTRUCTION, gmr_messages  # noqa: E402
from minigmr.scoring import Reranker  # noqa: E402


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and all its descendants (vLLM's engine core is a child)."""
    import psutil  # comes with vllm
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def vllm_scorer(ckpt: str, dtype: str, impl: str, processor):
    from vllm import LLM
    llm = LLM(model=ckpt, runner="pooling", convert="classify", dtype=dtype, model_impl=impl, enforce_eager=True,
              max_model_len=8192, limit_mm_per_prompt={"image": 2}, seed=0,
              hf_overrides={"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"})

    def score(query, docs):
        # the GMR prompt rendered by minigmr: vLLM expands each <|image_pad|> to the image's tokens itself
        prompts = []
        for d in docs:
            chat = gmr_messages(DEFAULT_INSTRUCTION, query, d)
            images = [x for x in (query, d) if not isinstance(x, str)]
            prompt = {"prompt": processor.render(chat)}
            if images:
                prompt["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            prompts.append(prompt)
        out = llm.classify(prompts, use_tqdm=False)
        return torch.tensor([o.outputs.probs[-1] for o in out])  # the "yes" class of ["no", "yes"]
    return score


def measure(name: str, sides: dict, args, tokenizer) -> dict:
    """A warm-up (whose scores are compared), then `repeats` alternating timed calls. Every call gets documents of
    its own (draw k of bench.py's workload): vLLM caches prefixes and image encodings across requests, and a
    repeated request would time its caches, not the reranking."""
    work = [bench.make_workload(name, args, tokenizer, draw) for draw in range(args.repeats + 1)]  # as bench.py
    scores = {impl: side(work[0]["query"], work[0]["docs"]) for impl, side in sides.items()}
    times, cpu = {impl: [] for impl in sides}, {impl: [] for impl in sides}
    for rep, w in enumerate(work[1:]):
        for impl in list(sides)[::1 if rep % 2 == 0 else -1]:
            # the side before keeps its idle OpenMP threads spinning for a while (Intel's KMP_BLOCKTIME, 200 ms by
            # default, in vLLM's worker): let them stop, so that no call is timed against another side's tail
            time.sleep(args.settle)
            c0, t0 = tree_cpu_seconds(), time.perf_counter()
            sides[impl](w["query"], w["docs"])
            times[impl].append(time.perf_counter() - t0)
            cpu[impl].append(tree_cpu_seconds() - c0)
    n = len(work[0]["docs"])
    out = dict(what=work[0]["what"], n=n)
    for impl in sides:
        out[impl] = dict(pairs_per_s=n / statistics.median(times[impl]), cpu_s_per_pair=statistics.median(cpu[impl]) / n,
                         max_abs_diff_vs_minigmr=float((scores[impl] - scores["minigmr"]).abs().max()))
    print(name, {impl: [round(t, 2) for t in ts] for impl, ts in times.items()}, "s", file=sys.stderr)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", nargs="+", default=["W1", "W2", "W3"], choices=["W1", "W2", "W3"],
                   help="bench.py's scoring workloads to run")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="both sides' dtype")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for each side (vLLM: cores bound from 0)")
    p.add_argument("--impls", nargs="+", default=["vllm", "transformers"], choices=["vllm", "transformers"],
                   help="vLLM model implementations to compare (its native Qwen2.5-VL and/or its transformers backend)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per side, after a warm-up")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds of idle before each timed call (the previous side's spinning threads stop)")
    p.add_argument("--quick", action="store_true", help="a quarter of the candidates (as bench.py --quick)")
    p.add_argument("--batch-size", type=int, default=16, help="minigmr's candidates per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (as bench.py)")
    p.add_argument("--workdir", required=True, help="checkpoint folder, written by this script if missing")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.batch_size < 1 or args.settle < 0:
        p.error("--repeats, --threads and --batch-size must be >= 1, --settle >= 0")
    try:
        import vllm
    except ImportError as e:
        sys.exit(f"tools/bench_vllm.py needs vllm, which does not import here ({e}); see docs/experiments.md")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB
    torch.set_num_threads(args.threads)
    args.image_side, args.device, args.config = 224 if args.quick else 448, "cpu", "small"
    args.dtype_t = getattr(torch, args.dtype)
    ckpt = os.path.join(args.workdir, "checkpoint")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        bench.build_checkpoint(argparse.Namespace(seed=args.seed, device="cpu", workloads=[]),
                               bench.model_config("small"), ckpt)
    rr = Reranker.from_pretrained(ckpt, dtype=args.dtype_t, batch_size=args.batch_size)
    sides = {"minigmr": lambda q, d: torch.tensor(rr.score(q, d))}
    for impl in args.impls:
        sides[f"vllm-{impl}"] = vllm_scorer(ckpt, args.dtype, impl, rr.processor)
    results = {name: measure(name, sides, args, rr.processor.tokenizer) for name in args.workloads}
    res = dict(dtype=args.dtype, threads=args.threads, vllm=vllm.__version__, torch=torch.__version__,
               quick=args.quick, workloads=results)
    for name, r in results.items():
        print(f"{name} {r['what']}")
        for impl in sides:
            x = r[impl]
            print(f"    {impl:18} {x['pairs_per_s']:8.2f} pairs/s  {x['cpu_s_per_pair']:7.3f} CPU-s/pair  "
                  f"max|dp| vs minigmr {x['max_abs_diff_vs_minigmr']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
