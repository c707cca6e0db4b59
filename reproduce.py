"""The paper in miniature: train and evaluate GMR's probes (arXiv 2510.14824 §4: Table 1 weight x direction, Table 2
what the weight does, Figure 5 negatives) on the synthetic world, several seeds per cell, and write a table with 95%
intervals, verdicts computed from them, the curves of the mechanism, and every run's raw numbers.

    python reproduce.py                      # quick: Table 1, 3 seeds (README, "The paper in miniature")
    python reproduce.py --mode full          # Tables 1 and 2 and Figure 5, 3 seeds, longer runs
    python reproduce.py --rebuild --out runs/reproduce-quick   # the table and figures again from runs/*.json

Every cell is train.py --objective url with its weight and direction (minigmr/reproduction.py), from the same
checkpoint, on the same data with the same steps, lr schedule and batch: seed k draws the same batches and negatives
in every cell, so cells are compared on paired runs. Each run is then evaluated by eval.py on the world's suite: the
first-stage (embedder) top candidates of every query, reranked. Runs are single-threaded (`--threads-per-run 1`)
and as many run side by side as there are idle cores: one thread sums floats in one fixed order, so a run is a pure
function of its seed on a given CPU type. A finished run is kept as runs/<cell>-seed<k>.json and not run again.

On GPUs with a real model and data (train.py's flags after `--` go to every training run):

    python reproduce.py --mode full --model Qwen2.5-VL-3B-Instruct --data train.jsonl --suite-dir mrb/ \
        --workers 1 --threads-per-run 8 --steps 3000 --eval-dtype bfloat16 -- --train lora --lr 1e-4 --micro-batch 2

Outputs in --out: results.md (the table), summary.json (every number of it), runs/*.json (raw: each query's
metric, the training log), weights.png (W+ / W-, SFT loss, held-out metric over steps per cell), negatives.png
(full mode: nDCG@10 against N). The figures need the plot extra (matplotlib); without it they are skipped.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm

from minigmr import plot, reproduction
from minigmr.files import read_json, write_json
from minigmr.data import read_jsonl
from minigmr.hardware import choose_threads, cpu_model
from minigmr.synth import ensure_world

ROOT = os.path.dirname(os.path.abspath(__file__))
# quick: Table 1 within a 30-minute budget on a 2-core CPU, world generation included; full: every probe, hours
MODES = {"quick": {"seeds": 3, "steps": 400}, "full": {"seeds": 3, "steps": 1000}}
ALSO = "run.attributes.trec"  # where a suite has it (the synthetic world), runs are also evaluated on its candidates
LOGGED = ("step", "loss", "sft_loss", "w_pos", "w_neg", "lr", "grad_norm", "elapsed_s")  # kept in the raw JSON


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=list(MODES), default="quick", help="quick: Table 1; full: Tables 1 and 2 and "
                   "Figure 5 (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 per cell (default: 3)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run (default: quick 400, full "
                   "1000)")
    p.add_argument("--negatives", type=int, default=4, help="negatives N of Tables 1 and 2 (the paper's analysis "
                   "runs: 4; default: %(default)s)")
    p.add_argument("--fig5-negatives", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="full mode: the N of Figure 5's SFT and InfoNCE curves (default: %(default)s)")
    p.add_argument("--tau", type=float, default=reproduction.TAU, help="the tau-mask's threshold of Table 2 (the "
                   "paper does not report it; default: %(default)s)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the synthetic world's, trained with "
                   "--train full as the demo)")
    p.add_argument("--data", default=None, help="training JSONL (default: the synthetic world's)")
    p.add_argument("--suite-dir", default=None, help="evaluation suite folder (default: the synthetic world's)")
    p.add_argument("--world", default=os.path.join(ROOT, "data", "synth"),
                   help="the synthetic world's folder, generated if absent (default: data/synth, as train.py's)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out check every K steps in each run, for the "
                   "learning curves (train.py --eval-every; default: steps / 5; 0: none)")
    p.add_argument("--eval-queries", type=int, default=2, help="queries per dataset of that check (default: "
                   "%(default)s)")
    p.add_argument("--second-candidates", action=argparse.BooleanOptionalAction, default=None,
                   help=f"also evaluate every run on the candidates of {ALSO}, where each dataset has one (the "
                   "synthetic world's attribute formula, recall@30 near 1: the reranker's own skill, beside the "
                   "pipeline's); default: on in full mode, off in quick mode (its time budget)")
    p.add_argument("--eval-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="eval.py --dtype of the final evaluation (default: %(default)s, the same numbers everywhere)")
    p.add_argument("--workers", type=int, default=None, help="runs side by side (default: the idle cores / "
                   "--threads-per-run)")
    p.add_argument("--threads-per-run", type=int, default=1, help="CPU threads of each run (default: %(default)s: "
                   "deterministic)")
    p.add_argument("--out", default=None, help="output folder (default: runs/reproduce-<mode>)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep each run's train.py folder (default: "
                   "deleted once its numbers are in runs/*.json)")
    p.add_argument("--rebuild", action="store_true", help="only rebuild the table and figures from --out/runs/*.json")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags passed to every train.py run")
    a = p.parse_args(argv)
    a.train_args = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    a.seeds = a.seeds or MODES[a.mode]["seeds"]
    a.second_candidates = a.mode == "full" if a.second_candidates is None else a.second_candidates
    a.steps = a.steps or MODES[a.mode]["steps"]
    a.eval_every = max(1, a.steps // 5) if a.eval_every is None else a.eval_every
    a.out = a.out or os.path.join("runs", f"reproduce-{a.mode}")
    bad = [f"--{k.replace('_', '-')} must be >= {low}, got {getattr(a, k)}" for k, low in
           (("seeds", 1), ("steps", 1), ("negatives", 1), ("eval_every", 0), ("eval_queries", 1),
            ("threads_per_run", 1)) if getattr(a, k) < low]
    bad += [f"--fig5-negatives must all be >= 1, got {a.fig5_negatives}"] if min(a.fig5_negatives) < 1 else []
    bad += [f"--tau must be in [0, 1], got {a.tau}"] if not 0 <= a.tau <= 1 else []
    bad += [f"--workers must be >= 1, got {a.workers}"] if a.workers is not None and a.workers < 1 else []
    if bad:
        p.error("; ".join(bad))
    return a


def slug(cell: str, seed: int) -> str:
    return cell.replace("+", "_").replace(" ", "_").replace("=", "") + f"-seed{seed}"


def commands(a, paths, cell, seed, work):
    """(train.py argv or None, {candidate set: eval.py argv}) of one run; cell None: the starting checkpoint."""
    model = paths["model"] if cell is None else os.path.join(work, "train", "merged")
    evaluate = {name: [sys.executable, os.path.join(ROOT, "eval.py"), "--data-dir", suite, "--model", model, "--dtype",
                       a.eval_dtype, "--threads", str(a.threads_per_run), "--json",
                       os.path.join(work, f"eval-{name}.json"), "--cache-dir", os.path.join(work, "cache")]
                for name, suite in paths["suites"].items()}
    if cell is None:
        return None, evaluate
    weight, direction, negatives, tau = cell
    train = [sys.executable, os.path.join(ROOT, "train.py"), *reproduction.cell_flags(weight, direction, negatives, tau),
             "--model", paths["model"], "--data", paths["data"], "--steps", str(a.steps), "--seed", str(seed),
             "--threads", str(a.threads_per_run), "--out", os.path.join(work, "train"), "--save-every", str(a.steps)]
    if a.eval_every:
        train += ["--eval-every", str(a.eval_every), "--eval-suite", paths["suites"]["run.trec"], "--eval-queries",
                  str(a.eval_queries)]
    return train + paths["train_defaults"] + a.train_args, evaluate


def run_one(a, paths, name, cell, seed):
    """Train and evaluate one (cell, seed); -> its raw record, also written to runs/<slug>.json (atomically)."""
    out_json = os.path.join(a.out, "runs", slug(name, seed) + ".json")
    work = os.path.join(a.out, "work", slug(name, seed))
    train, evaluate = commands(a, paths, cell, seed, work)
    config = {"train": (train or [None] * 2)[2:], **{f"eval {k}": v[2:] for k, v in evaluate.items()}}
    config = {k: [x.replace(work, "<run>") for x in v] for k, v in config.items()}  # no interpreter, no run folder
    if os.path.exists(out_json):
        have = read_json(out_json)
        if have.get("config") != config:
            raise ValueError(f"{out_json} was made with other settings; use another --out (or delete it)")
        return have
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads_per_run)}
    seconds = {}
    for what, argv in ([("train", train)] if train else []) + [(f"eval {k}", v) for k, v in evaluate.items()]:
        t0 = time.time()
        with open(os.path.join(work, what.replace(" ", "-") + ".log"), "w") as log:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if rc != 0:
            raise RuntimeError(f"{name} seed {seed}: {what} failed (exit {rc}); its output: "
                               f"{os.path.join(work, what.replace(' ', '-') + '.log')}")
        seconds[what] = round(time.time() - t0, 1)
    log = [{k: line[k] for k in line if k in LOGGED or k.startswith("val_")}
           for _, line in read_jsonl(os.path.join(work, "train", "log.jsonl"))] if train else []
    weight, direction, negatives, tau = cell or (None,) * 4
    record = {"cell": name, "seed": seed, "weight": weight, "direction": direction, "negatives": negatives,
              "tau": tau, "steps": a.steps, "config": config, "seconds": seconds, "machine": cpu_model(), "log": log}
    for k in evaluate:  # the first candidate set is the primary one: per_query / first_stage at the top level
        res = read_json(os.path.join(work, f"eval-{k}.json"))["datasets"]
        numbers = {"main_metric": {ds: r["main_metric"] for ds, r in res.items()},
                   "per_query": {ds: {q: v[1] for q, v in r["per_query"].items()} for ds, r in res.items()},
                   "first_stage": {ds: {q: v[0] for q, v in r["per_query"].items()} for ds, r in res.items()}}
        if k == "run.trec":
            record.update(numbers)
        else:
            record.setdefault("also", {})[k] = numbers
    write_json(out_json, record)
    if not a.keep_checkpoints:
        shutil.rmtree(work)
    return record


def suite_view(suite: str, run_file: str, out: str) -> str:
    """A suite whose datasets rank `run_file` (e.g. run.attributes.trec) as their first stage: symlinks to every other
    file of each dataset folder, so eval.py reads the same queries, corpus and images."""
    for ds in sorted(os.listdir(suite)):
        src = os.path.join(suite, ds)
        if not os.path.isdir(src):
            continue
        dst = os.path.join(out, ds)
        os.makedirs(dst, exist_ok=True)
        for entry in os.listdir(src):
            target = os.path.join(src, run_file if entry == "run.trec" else entry)
            link = os.path.join(dst, entry)
            if entry != run_file and not os.path.lexists(link):
                os.symlink(target, link)
    return out


def figures(a, runs, summary):
    """weights.png (every cell's mean curves over seeds) and, with Figure 5's cells, negatives.png."""
    try:
        import matplotlib  # noqa: F401 (only to know whether the plot extra is installed)
    except ImportError:
        print('figures skipped: pip install -e ".[plot]" for matplotlib, then rerun with --rebuild')
        return []
    trained = [r for r in runs if r["log"]]
    cells = sorted({r["cell"] for r in trained}, key=lambda c: (int(c.rsplit("N=", 1)[1]), c))
    curves = {c: [r["log"] for r in trained if r["cell"] == c] for c in cells}
    made = [plot.draw_curves(curves, os.path.join(a.out, "weights.png"), title="mean over seeds")]
    fig5 = {}
    for c, res in summary["cells"].items():
        r = next(r for r in runs if r["cell"] == c)
        if r["weight"] == r["direction"] and r["tau"] is None:
            label = "SFT (W_SFT+D_SFT)" if r["weight"] == "sft" else "InfoNCE (W_CL+D_CL)"
            fig5.setdefault(label, []).append((r["negatives"], res["estimate"], *res["ci95"]))
    if len({n for rows in fig5.values() for n, *_ in rows}) > 1:
        made.append(plot.draw_negatives(fig5, os.path.join(a.out, "negatives.png")))
    return made


def main(argv=None):
    a = parse_args(argv)
    start = time.time()
    os.makedirs(os.path.join(a.out, "runs"), exist_ok=True)
    planned = reproduction.plan(a.mode, a.negatives, tuple(a.fig5_negatives), a.tau)
    if not a.rebuild:
        synthetic = a.model is None or a.data is None or a.suite_dir is None
        world = ensure_world(a.world) if synthetic else {}
        paths = {"model": os.path.abspath(a.model or world["checkpoint"]),
                 "data": os.path.abspath(a.data or world["train"]),
                 "suites": {"run.trec": os.path.abspath(a.suite_dir or world["suite"])},
                 # the tiny model: every weight trains, as in the demo; 8 groups per forward (same batch, faster)
                 "train_defaults": ["--train", "full", "--micro-batch", "8", "--grad-accum", "1"] if a.model is None
                 else []}
        suite = paths["suites"]["run.trec"]
        if a.second_candidates and all(os.path.isfile(os.path.join(suite, d, ALSO)) for d in os.listdir(suite) if os.path.isdir(
                os.path.join(suite, d))):  # the synthetic world's ablation first stage: a second set of candidates
            paths["suites"][ALSO] = suite_view(suite, ALSO, os.path.join(os.path.abspath(a.out), "suite-" + ALSO))
        jobs = [(name, cell, seed) for seed in range(a.seeds) for name, cell in planned.items()]
        jobs.sort(key=lambda j: -j[1][2])  # the dearest (most negatives) first: the workers finish together
        jobs.append((reproduction.UNTRAINED, None, 0))  # the reference: the starting checkpoint, evaluated once
        workers = a.workers or max(1, choose_threads() // a.threads_per_run)
        print(f"{len(jobs) - 1} runs ({len(planned)} cells x {a.seeds} seeds, {a.steps} steps each) and the untrained "
              f"reference, {workers} side by side, {a.threads_per_run} thread(s) each; output in {a.out}")
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(run_one, a, paths, *j) for j in jobs]
            for f in tqdm(as_completed(futures), total=len(futures), desc="runs"):
                try:
                    f.result()
                except (ValueError, RuntimeError, OSError) as e:  # a failed run stops here, naming its log
                    pool.shutdown(cancel_futures=True)  # the runs under way finish; their JSON stays valid
                    sys.exit(f"reproduce.py: error: {e}")
        if not a.keep_checkpoints:
            shutil.rmtree(os.path.join(a.out, "work"), ignore_errors=True)
    files = sorted(os.path.join(a.out, "runs", f) for f in os.listdir(os.path.join(a.out, "runs")) if f.endswith(".json"))
    runs = reproduction.load_runs(files)
    if not runs:
        raise SystemExit(f"reproduce.py: error: no runs in {a.out}/runs")
    summary = reproduction.summarise(runs, a.negatives, tuple(a.fig5_negatives), a.tau)
    others = sorted({k for r in runs for k in r.get("also", {})})
    summary["also"] = {k: reproduction.summarise([{**r, **r["also"][k]} for r in runs if k in r.get("also", {})],
                                                 a.negatives, tuple(a.fig5_negatives), a.tau) for k in others}
    previous = os.path.join(a.out, "summary.json")  # --rebuild keeps the wall time of the run that made the runs
    wall = read_json(previous)["meta"]["wall_seconds"] if a.rebuild and os.path.exists(previous) else None
    meta = {"mode": a.mode, "what": f"{len({r['cell'] for r in runs} - {reproduction.UNTRAINED})} cells, seeds "
            f"{sorted({r['seed'] for r in runs})}, {runs[0]['steps']} steps per run",
            "paper_cells": reproduction.paper_numbers(a.negatives, a.tau), "runs": len(runs),
            "run_seconds": sum(sum(r["seconds"].values()) for r in runs), "machine": runs[0]["machine"],
            "wall_seconds": wall if a.rebuild else time.time() - start}
    with open(os.path.join(a.out, "results.md.tmp"), "w") as f:
        f.write(reproduction.markdown(summary, meta))
    os.replace(os.path.join(a.out, "results.md.tmp"), os.path.join(a.out, "results.md"))
    write_json(os.path.join(a.out, "summary.json"), {**summary, "meta": meta})
    made = figures(a, runs, summary)
    print(open(os.path.join(a.out, "results.md")).read())
    print(f"done in {(time.time() - start) / 60:.1f} min; {', '.join([os.path.join(a.out, 'results.md'), *made])}")


if __name__ == "__main__":
    main()
