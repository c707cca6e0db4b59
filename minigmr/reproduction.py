"""The paper's probes as cells, their statistics and verdicts (GMR, arXiv 2510.14824 §4: Tables 1 and 2, Figure 5;
docs/gmr.md §2.4). reproduce.py trains and evaluates the cells; this module only reads their per-query numbers.

A cell is one training recipe of the unified reranking loss (losses.url_loss): a weight W (sft, cl, or all-ones),
a direction D (sft or cl), an optional tau-mask and N negatives. SFT is exactly (W_SFT, D_SFT) and InfoNCE exactly
(W_CL, D_CL) (tests/test_losses.py), so Figure 5's two curves are those cells at several N.

Statistics. Every run of a cell (one seed) gives the main metric of every evaluated query: X[seed, dataset, query].
A cell's number is the macro mean over datasets (as MRB averages) of the mean over seeds and queries. A finding is
a contrast, a weighted sum of cells (e.g. SFT - CL, or the weight effect minus the direction effect), evaluated on
the same seeds and queries for every cell it involves (paired). Its 95% interval is a two-way bootstrap: seeds and,
within each dataset, queries are resampled with replacement, independently (Field & Welsh 2007 for crossed
designs), so the interval carries both the training noise and the choice of queries. The verdict follows from the
interval alone: above 0 "reproduced", below 0 "not reproduced (reversed)", else "inconclusive at this resolution".
"""
import numpy as np

from .files import read_json

BOOTSTRAP, SEED = 10000, 0
UNTRAINED = "untrained"  # the reference run: the starting checkpoint evaluated as it is (its file also holds the first stage)
TAU = 0.1  # the tau-mask's threshold: the paper does not report its value (docs/gmr.md §2.4), so this is ours


def cell_name(weight: str, direction: str, negatives: int, tau: float | None = None) -> str:
    """e.g. "W_SFT+D_CL N=4", "W_ones+tau0.1+D_SFT N=4": what a reader of Tables 1 and 2 recognises."""
    w = {"sft": "SFT", "cl": "CL", "ones": "ones"}[weight] + (f"+tau{tau:g}" if tau is not None else "")
    return f"W_{w}+D_{direction.upper()} N={negatives}"


def cell_flags(weight: str, direction: str, negatives: int, tau: float | None = None) -> list:
    """train.py flags of a cell: the unified loss with this weight and direction."""
    flags = ["--objective", "url", "--weight", weight, "--direction", direction, "--negatives", str(negatives)]
    return flags + (["--tau", str(tau)] if tau is not None else [])


def plan(mode: str, negatives: int, fig5_negatives=(1, 2, 4, 8), tau: float = TAU) -> dict:
    """{cell name: (weight, direction, negatives, tau)} of a mode. quick: Table 1; full: Tables 1, 2 and Figure 5
    (SFT and InfoNCE at each of fig5_negatives; the cell at `negatives` is Table 1's, trained once)."""
    cells = [(w, d, negatives, None) for w in ("sft", "cl") for d in ("sft", "cl")]
    if mode == "full":
        cells += [("ones", "sft", negatives, None), ("ones", "sft", negatives, tau)]
        cells += [(w, w, n, None) for n in fig5_negatives for w in ("sft", "cl")]
    elif mode != "quick":
        raise ValueError(f"mode must be 'quick' or 'full', got {mode!r}")
    return {cell_name(*c): c for c in dict.fromkeys(cells)}


def findings(negatives: int, fig5_negatives=(1, 2, 4, 8), tau: float = TAU) -> list:
    """[(finding, {cell: coefficient}, paper's difference in MRB points or a note)]: the contrasts the verdicts
    are computed on. Cells a run lacks make the finding absent from its table, never guessed."""
    c = lambda w, d, n=negatives, t=None: cell_name(w, d, n, t)
    ss, sc, cs, cc = c("sft", "sft"), c("sft", "cl"), c("cl", "sft"), c("cl", "cl")
    out = [("SFT beats CL (W_SFT+D_SFT - W_CL+D_CL)", {ss: 1, cc: -1}, 58.09 - 56.40),
           ("the SFT weight beats the CL weight (mean over both directions)",
            {ss: .5, sc: .5, cs: -.5, cc: -.5}, (58.09 + 57.88 - 56.99 - 56.40) / 2),
           ("the SFT direction beats the CL direction (mean over both weights)",
            {ss: .5, cs: .5, sc: -.5, cc: -.5}, (58.09 + 56.99 - 57.88 - 56.40) / 2),
           ("the weight explains more of the gap than the direction (weight effect - direction effect)",
            {sc: 1, cs: -1}, 57.88 - 56.99),  # (ΔW - ΔD) of the two lines above simplifies to this
           ("the SFT weight beats the all-ones weight (W_SFT - W_ones)", {ss: 1, c("ones", "sft"): -1}, 58.19 - 49.47),
           ("the tau-mask rescues the all-ones weight (W_ones+tau - W_ones)",
            {c("ones", "sft", t=tau): 1, c("ones", "sft"): -1}, 56.57 - 49.47),
           ("the SFT weight beats all-ones + tau-mask (W_SFT - W_ones+tau)",
            {ss: 1, c("ones", "sft", t=tau): -1}, 58.19 - 56.57)]
    lo, hi = min(fig5_negatives), max(fig5_negatives)
    out += [(f"SFT improves with more negatives (N={hi} - N={lo})", {c("sft", "sft", hi): 1, c("sft", "sft", lo): -1},
             "increases from 2 to 16 (58.68 at 16)")]
    if 2 in fig5_negatives and lo < 2 < hi:  # the paper's curve starts at N = 2: its own range, apart from N = 1
        out.append((f"SFT improves over the paper's range of N (N={hi} - N=2)",
                    {c("sft", "sft", hi): 1, c("sft", "sft", 2): -1}, "increases from 2 to 16 (58.68 at 16)"))
    out += [("SFT beats InfoNCE across N (mean over N)",
             {**{c("sft", "sft", n): 1 / len(fig5_negatives) for n in fig5_negatives},
              **{c("cl", "cl", n): -1 / len(fig5_negatives) for n in fig5_negatives}}, "above at every N (CL values "
             "not reported)")]
    return out


def paper_numbers(negatives: int, tau: float = TAU) -> dict:
    """{cell name: the paper's MRB average} (its analysis runs used 4 negatives; Figure 5 reports SFT at 16 only)."""
    c = lambda w, d, n=negatives, t=None: cell_name(w, d, n, t)
    return {c("sft", "sft"): "58.09 (Table 2: 58.19)", c("sft", "cl"): "57.88", c("cl", "sft"): "56.99",
            c("cl", "cl"): "56.40", c("ones", "sft"): "49.47", c("ones", "sft", t=tau): "56.57",
            c("sft", "sft", 16): "58.68"}


def grid(runs: list, cell: str, seeds: list) -> dict:
    """{dataset: X (seeds, queries)} of one cell's main metric, the queries in sorted order; ValueError naming the
    run when a seed is missing or a run evaluated other queries than the others."""
    by_seed = {r["seed"]: r for r in runs if r["cell"] == cell}
    missing = [s for s in seeds if s not in by_seed]
    if missing:
        raise ValueError(f"cell {cell!r}: no run for seed(s) {missing}")
    first = by_seed[seeds[0]]["per_query"]
    out = {}
    for ds, queries in sorted(first.items()):
        qids = sorted(queries)
        rows = []
        for s in seeds:
            got = by_seed[s]["per_query"].get(ds, {})
            if sorted(got) != qids:
                raise ValueError(f"run {cell!r} seed {s}: dataset {ds!r} has other queries than seed {seeds[0]}'s")
            rows.append([got[q] for q in qids])
        out[ds] = np.asarray(rows, dtype=np.float64)
    return out


def contrast(runs: list, coefficients: dict, n: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """The contrast sum_c coef_c * cell_c on the seeds all its cells share: {"estimate", "ci95" [low, high],
    "seeds", "queries", "seed_sd" (sd over seeds of the per-seed contrast)}, or None when a cell has no run."""
    seed_sets = [{r["seed"] for r in runs if r["cell"] == c} for c in coefficients]
    seeds = sorted(set.intersection(*seed_sets)) if seed_sets else []
    if not seeds:
        return None
    x = None
    for c, coef in coefficients.items():
        g = grid(runs, c, seeds)
        if x is not None and sorted(g) != sorted(x):
            raise ValueError(f"cell {c!r} was evaluated on other datasets ({sorted(g)}) than {sorted(x)}")
        x = {ds: coef * a + (x[ds] if x is not None else 0.0) for ds, a in g.items()}
    rng, s, means = np.random.default_rng(seed), len(seeds), np.zeros(n)
    pick_seeds = rng.integers(0, s, (n, s))  # the same seed resample for every dataset: a seed is one model
    for a in x.values():
        pick_queries = rng.integers(0, a.shape[1], (n, a.shape[1]))
        # (n, s, 1) x (n, 1, q) -> (n, s, q) resampled grid -> its mean (n,)
        means += a[pick_seeds[:, :, None], pick_queries[:, None, :]].mean(axis=(1, 2))
    means /= len(x)
    per_seed = np.mean([a.mean(axis=1) for a in x.values()], axis=0)  # (s,) macro mean of each seed
    return {"estimate": float(per_seed.mean()), "ci95": [float(v) for v in np.percentile(means, [2.5, 97.5])],
            "seeds": seeds, "queries": int(sum(a.shape[1] for a in x.values())),
            "seed_sd": float(per_seed.std(ddof=1)) if s > 1 else None}


def verdict(ci95) -> str:
    """What an interval on a contrast (expected sign: positive) says, and nothing else."""
    low, high = ci95
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not reproduced (reversed)"
    return "inconclusive at this resolution"


def summarise(runs: list, negatives: int, fig5_negatives=(1, 2, 4, 8), tau: float = TAU) -> dict:
    """Every cell's number and every finding's contrast with its verdict, from the raw runs."""
    refs = [r for r in runs if r["cell"] == UNTRAINED]
    runs = [r for r in runs if r["cell"] != UNTRAINED]
    cells = sorted({r["cell"] for r in runs})
    out = {"reference": {}, "cells": {c: contrast(runs, {c: 1}) for c in cells}, "findings": []}
    if refs:  # the first stage and the untrained reranker, for scale (no finding uses them)
        first = [{**refs[0], "cell": "first stage", "per_query": refs[0]["first_stage"]}]
        out["reference"] = {"first stage (the candidates' order)": contrast(first, {"first stage": 1}),
                            "untrained reranker (the starting checkpoint)": contrast(refs, {UNTRAINED: 1})}
    for name, coefs, paper in findings(negatives, fig5_negatives, tau):
        if all(c in cells for c in coefs):
            res = contrast(runs, coefs)
            out["findings"].append({"finding": name, "cells": coefs, "paper": paper, **res,
                                    "verdict": verdict(res["ci95"]), "half_width": (res["ci95"][1] - res["ci95"][0]) / 2})
    return out


def fmt(x: float, ci: tuple, scale: float = 100) -> str:
    """A difference with its interval, in points (x 100): '+1.23 [-0.40, +2.87]'."""
    return f"{x * scale:+.2f} [{ci[0] * scale:+.2f}, {ci[1] * scale:+.2f}]"


def block(summary: dict, paper: dict) -> list:
    """The markdown lines of one candidate set: cells beside the paper's numbers, findings with verdicts, resolution."""
    lines = ["| cell | seeds | ours | paper |", "|---|---|---|---|"]
    interval = lambda r: f"{r['estimate'] * 100:.2f} [{r['ci95'][0] * 100:.2f}, {r['ci95'][1] * 100:.2f}]"
    for name, res in summary.get("reference", {}).items():
        lines.append(f"| *{name}* | - | {interval(res)} | |")
    for name, res in summary["cells"].items():
        if res is not None:
            lines.append(f"| {name} | {len(res['seeds'])} | {interval(res)} | {paper.get(name, '')} |")
    lines += ["", "| finding | ours: difference [95% CI] | paper | verdict |", "|---|---|---|---|"]
    for f in summary["findings"]:
        value = f"{f['paper']:+.2f}" if isinstance(f["paper"], float) else f["paper"]
        lines.append(f"| {f['finding']} | {fmt(f['estimate'], f['ci95'])} | {value} | **{f['verdict']}** |")
    widths = [f["half_width"] * 100 for f in summary["findings"]]
    spread = [f["seed_sd"] * 100 for f in summary["findings"] if f["seed_sd"] is not None]
    if widths:
        lines += ["", f"Resolution: the findings' 95% intervals have half-widths {min(widths):.2f} to "
                  f"{max(widths):.2f} points; a smaller true difference cannot be told from zero here."]
    if spread:
        lines.append(f"Seed-to-seed spread: the sd over seeds of a finding's difference is {min(spread):.2f} to "
                     f"{max(spread):.2f} points.")
    return lines


def markdown(summary: dict, meta: dict) -> str:
    """The result table of every candidate set: nDCG@10 x 100 beside the paper's MRB averages, findings, verdicts."""
    lines = [f"# The paper in miniature ({meta['mode']} mode)", "",
             f"{meta['what']}. Every number: main metric (nDCG@10) x 100, mean over seeds and queries, 95% two-way "
             "bootstrap interval over seeds and queries (minigmr/reproduction.py). The paper's numbers are MRB "
             "averages of 3B/7B models (arXiv 2510.14824 Tables 1-2, Figure 5): compare orderings and signs, not "
             "levels.", "", "## Reranking the suite's first stage (run.trec)", ""]
    lines += block(summary, meta["paper_cells"])
    for name, other in summary.get("also", {}).items():
        lines += ["", f"## Reranking the candidates of {name}", ""] + block(other, meta["paper_cells"])
    wall = f"{meta['wall_seconds'] / 60:.1f} min" if meta.get("wall_seconds") is not None else "not recorded"
    lines += ["", f"Runs: {meta['runs']}, their training and evaluation {meta['run_seconds'] / 60:.1f} min summed; "
              f"the whole command {wall} (world generation included when it ran), on {meta['machine']}."]
    return "\n".join(lines) + "\n"


def load_runs(paths: list) -> list:
    """The raw per-run JSON files reproduce.py writes (runs/*.json), for rebuilding the table with more cells."""
    runs = []
    for p in paths:
        r = read_json(p)
        if not isinstance(r, dict) or not {"cell", "seed", "per_query"} <= set(r):
            raise ValueError(f"{p}: not a reproduce.py run (needs 'cell', 'seed' and 'per_query')")
        runs.append(r)
    return runs
