"""PIVOT in miniature (arXiv 2510.16333; docs/gmr.md §6): does the post-training objective reshape the vision tower?

    python pivot.py --quick                          # the quick mode, on the world in data/synth
    python pivot.py --world data/synth --out runs/pivot --seeds 0 1 2 3 4

1. Arms: from the world's checkpoint, train.py with every weight trainable (--train full: vision tower, merger
   and decoder, as PIVOT's stage 2 trains all parts), the same data, steps and seeds, once per objective (sft,
   dpo, infonce); the untouched checkpoint is the `base` arm. Two train.py processes run side by side
   (--jobs), each single-threaded, so every run is deterministic.
2. Probes of each arm's frozen vision tower (minigmr/probes.py): linear probes of the four attributes on held-out
   pictures, and the localisation of the tower's response to the drawn group.
3. Transplant: the base checkpoint with the arm's vision tower and a fresh patch merger, trained with
   --train lora+projector --objective sft for a fixed budget, evaluated with eval.py on the suite's image datasets.

Every unit of work (a train.py run, an eval, one tower's probes) writes a done.json when complete and is skipped
when the command runs again, so `--max-minutes` can cut the work into pieces: the command stops starting new
units after that long, exits with status 3, and the same command continues. Writes OUT/pivot.md (the table and
the verdict, computed from the intervals), OUT/pivot.png (response maps of one picture under each encoder) and
OUT/results.json (every number; the raw per-run files stay under OUT/arms, OUT/probes, OUT/transplant).
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from minigmr.files import read_json, write_json
from minigmr.hardware import set_threads
from minigmr.model import Qwen25VL
from minigmr.probes import probe_pictures, probe_tower, weight_change, write_transplant
from minigmr.processor import ImageProcessor
from minigmr.report import paired_interval
from minigmr.scenes import ATTRIBUTES, POSITIONS
from minigmr.synth import ensure_world, world_paths

ROOT = os.path.dirname(os.path.abspath(__file__))
OBJECTIVES = ("sft", "dpo", "infonce")
ARMS = ("base",) + OBJECTIVES
COMPARE = (("dpo", "sft"), ("sft", "base"), ("dpo", "base"), ("infonce", "base"))
# quick: three seeds and small budgets; full: the sharper comparison (costs: docs/experiments.md, PIVOT in miniature)
PRESETS = {"quick": dict(seeds=[0, 1, 2], arm_steps=150, transplant_steps=100, probe_train=300, probe_test=300),
           "full": dict(seeds=[0, 1, 2, 3, 4], arm_steps=1500, transplant_steps=1000, probe_train=2000,
                        probe_test=1000)}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"}


class Unfinished(Exception):
    """The --max-minutes budget ran out before every unit was done."""


def run_units(units, jobs, deadline):
    """Run the units not done yet, `jobs` at a time; each unit is (folder, [steps]), a step a command list or a
    callable. A unit's done.json (its wall seconds) is written after its last step; none starts after deadline."""
    def one(folder, steps):
        if time.time() > deadline:
            return False
        if os.path.isdir(folder):
            shutil.rmtree(folder)  # an interrupted unit starts over
        os.makedirs(folder)
        start = time.time()
        for i, step in enumerate(steps):
            if callable(step):
                step()
                continue
            with open(os.path.join(folder, f"log{i}.txt"), "w") as log:
                r = subprocess.run(step, env=ENV, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if r.returncode != 0:
                with open(log.name) as f:
                    tail = f.read()[-3000:]
                raise RuntimeError(f"{' '.join(map(str, step))} failed ({r.returncode}); log {log.name}:\n{tail}")
        write_json(os.path.join(folder, "done.json"), {"seconds": round(time.time() - start, 1)})
        return True

    todo = [(f, s) for f, s in units if not os.path.exists(os.path.join(f, "done.json"))]
    with ThreadPoolExecutor(jobs) as pool:
        finished = [r.result() for r in [pool.submit(one, f, s) for f, s in todo]]
    if not all(finished):
        raise Unfinished()


def train_cmd(model, data, out, objective, mode, steps, seed):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", model, "--data", data, "--out", out,
            "--objective", objective, "--train", mode, "--steps", str(steps), "--seed", str(seed), "--threads", "1",
            "--save-every", str(steps), "--log-every", "10"]


def image_datasets(suite):
    """The suite's datasets whose task has an image (I) on either side (T->VD's pages are pictures of text)."""
    names = sorted(n for n in os.listdir(suite) if os.path.isfile(os.path.join(suite, n, "meta.json")))
    return [n for n in names if "I" in read_json(os.path.join(suite, n, "meta.json"))["task"]]


def macro(lists):
    return sum(sum(x) / len(x) for x in lists) / len(lists)


def summarise(out, p, suite_names):
    """Every number of the table from the per-run files: per arm and measure (mean over seeds, its 95% interval
    stratified by seed, the per-seed means), the paired differences of COMPARE and the towers' weight change."""
    seeds = p["seeds"]
    probes = {(a, s): read_json(os.path.join(out, "probes", f"{a}-s{s}", "result.json")) for a in ARMS for s in seeds}
    evals = {(a, s): read_json(os.path.join(out, "transplant", f"{a}-s{s}", "eval.json"))["datasets"]
             for a in ARMS for s in seeds}
    measures = {f"probe {a}": lambda arm, s, a=a: [probes[arm, s]["probe"][a]] for a in ATTRIBUTES}
    measures["localisation"] = lambda arm, s: [probes[arm, s]["localisation"]["share"]]
    # per (seed, dataset): each query's reranked nDCG@10, in the same query order for every arm (paired)
    measures["transplant nDCG@10"] = lambda arm, s: [
        [v[1] for _, v in sorted(evals[arm, s][n]["per_query"].items())] for n in suite_names]
    lists = {(m, arm): [x for s in seeds for x in get(arm, s)] for m, get in measures.items() for arm in ARMS}
    arms = {arm: {m: {"mean": macro(lists[m, arm]), "ci95": paired_interval(lists[m, arm]),
                      "per_seed": [macro(get(arm, s)) for s in seeds]} for m, get in measures.items()}
            for arm in ARMS}
    diffs = {}
    for a, b in COMPARE:
        d = {m: [[x - y for x, y in zip(la, lb)] for la, lb in zip(lists[m, a], lists[m, b])] for m in measures}
        diffs[f"{a} - {b}"] = {m: {"mean": macro(v), "ci95": paired_interval(v)} for m, v in d.items()}
    area = [x for s in seeds for x in probes["base", s]["localisation"]["area"]]
    change = {arm: [probes[arm, s]["weight_change"] for s in seeds] for arm in OBJECTIVES}
    return {"arms": arms, "differences": diffs, "area_share": sum(area) / len(area), "weight_change": change}


def word(ci):
    return "higher" if ci[0] > 0 else "lower" if ci[1] < 0 else "no clear difference"


def verdict(summary):
    """PIVOT's claim at this scale, read off the DPO - SFT intervals only (never hand-written)."""
    d = summary["differences"]["dpo - sft"]
    calls = {m: word(v["ci95"]) for m, v in d.items()}
    lines = [f"- DPO vs SFT, {m}: {calls[m]} ({v['mean']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}])"
             for m, v in d.items()]
    up = [m for m, c in calls.items() if c == "higher"]
    down = [m for m, c in calls.items() if c == "lower"]
    if up and not down:
        head = f"PIVOT's claim holds here on {', '.join(up)}: the DPO encoder beats the SFT one, 95% intervals above 0."
    elif down and not up:
        head = f"PIVOT's claim is contradicted here: the SFT encoder beats the DPO one on {', '.join(down)}."
    elif up and down:
        head = f"Mixed: DPO above SFT on {', '.join(up)}, below on {', '.join(down)}."
    else:
        head = "Not resolved at this scale: every DPO - SFT interval contains 0."
    return head, lines


def cell(v):
    return f"{v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"


def write_table(path, summary, p, run_seconds):
    ms = list(summary["arms"]["base"])
    head, lines = verdict(summary)
    rows = ["| arm | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
    rows += [f"| {arm} | " + " | ".join(cell(summary["arms"][arm][m]) for m in ms) + " |" for arm in ARMS]
    rows += ["", "| paired difference | " + " | ".join(ms) + " |", "|---" * (len(ms) + 1) + "|"]
    rows += [f"| {k} | " + " | ".join(f"{v[m]['mean']:+.3f} [{v[m]['ci95'][0]:+.3f}, {v[m]['ci95'][1]:+.3f}]"
                                      for m in ms) + " |" for k, v in summary["differences"].items()]
    text = "\n".join([
        "# PIVOT in miniature", "",
        f"Seeds {p['seeds']}; arms: {p['arm_steps']} steps of train.py --train full; transplant: "
        f"{p['transplant_steps']} steps of --train lora+projector --objective sft; probes: {p['probe_train']} "
        f"training and {p['probe_test']} held-out pictures per seed. Mean over seeds, 95% bootstrap interval over "
        "pictures (probes, localisation) or queries (transplant, macro mean of the image datasets), stratified by "
        f"seed. Localisation: share of the response inside the group's region (no localisation: the area share, "
        f"{summary['area_share']:.3f}). Sum of the units' wall times: {run_seconds / 60:.1f} minutes.", "",
        *rows, "", "Relative change of the vision tower's weights, ||w - w_base|| / ||w_base|| per seed: " + "; ".join(
            f"{arm} " + ", ".join(f"{x:.4f}" for x in v) for arm, v in summary["weight_change"].items()) + ".", "",
        f"**Verdict.** {head}", "", *lines, ""])
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def plot(path, maps, picture):
    """One row: the picture (its group's region outlined), then each arm's response map on the same picture."""
    import matplotlib  # the plot extra: only this function needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.4))
    x0, y0, x1, y1 = POSITIONS[picture["group"].position][1]
    for ax, (title, img) in zip(axes, [("picture", picture["image"])] + list(maps.items())):
        ax.imshow(img, cmap=None if title == "picture" else "magma", extent=(0, 1, 1, 0))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", lw=1.5))
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    g = picture["group"]
    fig.suptitle(f"response ||f(picture) - f(blank)|| per patch: {g.count} {g.colour} {g.shape} {g.position}",
                 fontsize=9)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--world", default=None, help="synthetic world folder (default: data/synth, generated if absent)")
    ap.add_argument("--out", default=os.path.join("runs", "pivot"), help="output folder (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"the quick preset {PRESETS['quick']} (default: full, "
                    f"{PRESETS['full']}); the flags below override either")
    ap.add_argument("--seeds", type=int, nargs="+", help="seeds: each arm, transplant and probe set once per seed")
    ap.add_argument("--arm-steps", type=int, help="train.py steps of each post-training arm")
    ap.add_argument("--transplant-steps", type=int, help="train.py steps of each transplant (lora+projector, sft)")
    ap.add_argument("--probe-train", type=int, help="pictures the linear probes are fitted on, per seed")
    ap.add_argument("--probe-test", type=int, help="held-out pictures the probes and localisation are scored on")
    ap.add_argument("--jobs", type=int, default=2, help="train.py / eval.py processes side by side, one thread "
                    "each; also the probes' threads (default: %(default)s)")
    ap.add_argument("--max-minutes", type=float, help="start no new unit after this long; exit 3 if work is left "
                    "(run the same command again to continue)")
    a = ap.parse_args(argv)
    preset = PRESETS["quick" if a.quick else "full"]
    p = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in preset.items()}
    if min(p["arm_steps"], p["transplant_steps"], p["probe_train"], p["probe_test"], a.jobs) < 1 or \
            len(set(p["seeds"])) != len(p["seeds"]):
        ap.error("--arm-steps, --transplant-steps, --probe-train, --probe-test and --jobs must be >= 1, --seeds "
                 "distinct")
    if a.world is None:
        w = ensure_world(os.path.abspath(os.path.join("data", "synth")))  # absolute: the subprocesses run in ROOT
    elif os.path.isfile(os.path.join(a.world, "world.json")):
        w = world_paths(os.path.abspath(a.world))
    else:
        ap.error(f"--world {a.world}: no world.json there (python -m minigmr.synth --out {a.world} writes one)")
    out, start = os.path.abspath(a.out), time.time()
    os.makedirs(out, exist_ok=True)
    settings = os.path.join(out, "settings.json")
    if os.path.exists(settings) and read_json(settings) != {**p, "world": os.path.abspath(w["root"])}:
        ap.error(f"--out {a.out} holds a run with other settings ({settings}); choose another --out")
    write_json(settings, {**p, "world": os.path.abspath(w["root"])})
    deadline = start + 60 * a.max_minutes if a.max_minutes else float("inf")
    suite_names = image_datasets(w["suite"])
    encoder = {("base", s): w["checkpoint"] for s in p["seeds"]}
    encoder.update({(o, s): os.path.join(out, "arms", f"{o}-s{s}", "run", "merged") for o in OBJECTIVES
                    for s in p["seeds"]})
    try:
        # 1. the arms
        run_units([(os.path.join(out, "arms", f"{o}-s{s}"), [train_cmd(
            w["checkpoint"], w["train"], os.path.join(out, "arms", f"{o}-s{s}", "run"), o, "full", p["arm_steps"],
            s)]) for s in p["seeds"] for o in OBJECTIVES], a.jobs, deadline)
        # 2. the probes, in this process
        set_threads(a.jobs)
        processor = ImageProcessor.from_pretrained(w["checkpoint"])
        base_tower = Qwen25VL.from_pretrained(w["checkpoint"]).vision
        for s in p["seeds"]:
            train_pics = probe_pictures(p["probe_train"], 10_000 + s)
            test_pics = probe_pictures(p["probe_test"], 20_000 + s)  # held out: another seed's pictures
            def probe(arm, s=s, train_pics=train_pics, test_pics=test_pics):
                tower = Qwen25VL.from_pretrained(encoder[arm, s]).vision
                result = probe_tower(tower, processor, train_pics, test_pics, seed=s)
                result["weight_change"] = weight_change(tower, base_tower)
                write_json(os.path.join(out, "probes", f"{arm}-s{s}", "result.json"), result)
            run_units([(os.path.join(out, "probes", f"{arm}-s{s}"), [lambda arm=arm: probe(arm)]) for arm in ARMS],
                      1, deadline)
        # 3. the transplants
        units = []
        for arm in ARMS:
            for s in p["seeds"]:
                d = os.path.join(out, "transplant", f"{arm}-s{s}")
                units.append((d, [
                    lambda d=d, arm=arm, s=s: write_transplant(w["checkpoint"], encoder[arm, s],
                                                               os.path.join(d, "init"), seed=s),
                    train_cmd(os.path.join(d, "init"), w["train"], os.path.join(d, "train"), "sft",
                              "lora+projector", p["transplant_steps"], s),
                    [sys.executable, os.path.join(ROOT, "eval.py"), "--data-dir", w["suite"], "--model",
                     os.path.join(d, "train", "merged"), "--datasets", *suite_names, "--json",
                     os.path.join(d, "eval.json"), "--dtype", "float32", "--threads", "1"]]))
        run_units(units, a.jobs, deadline)
    except Unfinished:
        print(f"pivot.py: stopped after --max-minutes {a.max_minutes}; run the same command again to continue",
              file=sys.stderr)
        return 3
    seconds = sum(read_json(os.path.join(root, f))["seconds"] for root, _, files in os.walk(out) for f in files
                  if f == "done.json")
    summary = summarise(out, p, suite_names)
    write_table(os.path.join(out, "pivot.md"), summary, p, seconds)
    s0 = p["seeds"][0]
    maps = {arm: read_json(os.path.join(out, "probes", f"{arm}-s{s0}", "result.json"))["example_map"] for arm in ARMS}
    write_json(os.path.join(out, "results.json"), {"settings": p, "datasets": suite_names, "unit_seconds": seconds,
                                                   **summary, "verdict": verdict(summary)})
    try:
        plot(os.path.join(out, "pivot.png"), maps, probe_pictures(1, 20_000 + s0)[0])
    except ImportError:
        print("pivot.py: matplotlib is not installed (pip install -e '.[plot]'): no figure", file=sys.stderr)
    print(open(os.path.join(out, "pivot.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
