"""The result tables eval.py prints and the macro means they show, MRB style (arXiv 2510.14824; docs/gmr.md §4).

aggregate() turns the per-dataset numbers into macro means of each dataset's main metric (every dataset weighs 1,
as MRB averages) per task type, per group (single-, cross-, fused-modal) and overall, each with a paired 95%
interval on the gain of the reranked over the first-stage ranking; report() prints them next to the recall
ceiling and, optionally, a baseline run (read by read_baseline() from an eval.py --json), and ends with a verdict.

The interval is a stratified paired bootstrap over queries (Efron & Tibshirani 1993; Sakai 2006 for IR): each
dataset's judged queries are resampled with replacement, the per-query differences (reranked - first stage, or
this run - the baseline) averaged per dataset, then over datasets as the macro mean is; 95% = the 2.5 and 97.5
percentiles of BOOTSTRAP resamples with a fixed seed, so the same numbers give the same interval.
"""
import sys

import numpy as np

from .data import TASK_GROUP, TASK_TYPES, read_json

GROUPS = ("single-modal", "cross-modal", "fused-modal")
BOOTSTRAP, SEED = 10000, 0


def paired_interval(diffs_per_dataset, n: int = BOOTSTRAP, seed: int = SEED):
    """(low, high) 95% interval of the macro mean over datasets of the per-query differences, or None when a
    dataset has none (e.g. a JSON written before per-query numbers were kept)."""
    if not diffs_per_dataset or any(len(d) == 0 for d in diffs_per_dataset):
        return None
    rng, means = np.random.default_rng(seed), np.zeros(n)
    for d in diffs_per_dataset:
        d = np.asarray(d, dtype=np.float64)
        means += d[rng.integers(0, len(d), (n, len(d)))].mean(axis=1)  # (n resamples, queries) -> (n,)
    low, high = np.percentile(means / len(diffs_per_dataset), [2.5, 97.5])
    return [float(low), float(high)]


def gains(rows):
    """Per dataset, the per-query main-metric differences reranked - first stage."""
    return [[b - a for a, b in r.get("per_query", {}).values()] for r in rows]


def aggregate(per_dataset):
    """Macro means over datasets of the main metric (first stage, reranked), of the ceiling, the judged queries and
    the paired 95% interval of the gain."""
    def mean(names):
        rows = [per_dataset[n] for n in names]
        avg = lambda get: sum(get(r) for r in rows) / len(rows)
        return {"datasets": len(rows), "queries": sum(r["queries"] for r in rows),
                "first_stage": avg(lambda r: r["first_stage"][r["main_metric"]]),
                "reranked": avg(lambda r: r["reranked"][r["main_metric"]]), "ceiling": avg(lambda r: r["ceiling"]),
                "gain_ci95": paired_interval(gains(rows)), "skipped": sum(r["skipped"] for r in rows)}
    select = lambda field, value: [n for n, r in per_dataset.items() if r[field] == value]
    return {"tasks": {t: mean(select("task", t)) for t in TASK_TYPES if select("task", t)},
            "groups": {g: mean(select("group", g)) for g in GROUPS if select("group", g)},
            "overall": mean(list(per_dataset))}


def vs_baseline(results, baseline, names):
    """Paired 95% interval of this run's reranked minus the baseline's, over the datasets `names`, or None."""
    theirs = baseline.get("datasets", {})
    diffs = []
    for n in names:
        mine, base = results["datasets"][n].get("per_query", {}), theirs.get(n, {}).get("per_query", {})
        if not mine or set(mine) != set(base):
            return None
        diffs.append([mine[q][1] - base[q][1] for q in mine])
    return paired_interval(diffs)


def table(header, rows):
    """Plain-text columns, left-aligned, two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows])


def interval(ci):
    return "-" if ci is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def report(results, top_k, metrics, baseline=None):
    """The printed tables: per dataset, per task type, per group and overall (main metric; every metric is in the
    JSON), then a verdict. baseline: the results of another run (eval.py --json) whose reranked numbers get their
    own columns."""
    f, datasets = (lambda x: f"{x:.4f}"), results["datasets"]
    depth = max((r.get("depth", top_k) for r in datasets.values()), default=top_k)
    ceil = f"ceiling (recall@{depth})"
    main = sorted({r["main_metric"] for r in datasets.values()})
    rows = [[n, r["task"], r["queries"], r["skipped"], f(r["first_stage"][r["main_metric"]]),
             f(r["reranked"][r["main_metric"]]), f"{r['reranked'][r['main_metric']] - r['first_stage'][r['main_metric']]:+.4f}",
             interval(paired_interval(gains([r]))), f(r["ceiling"])] for n, r in datasets.items()]
    out = [f"{'/'.join(main)}: the first stage's ranking, and its top {depth} reranked. gain = reranked - first "
           f"stage, with a paired 95% bootstrap interval over queries; {ceil} = share of the relevant documents "
           f"among the {depth} candidates (no reranker can do better)",
           table(["dataset", "task", "queries", "skipped", "first stage", "reranked", "gain", "95% CI", ceil], rows)]
    b = baseline or {}

    def numbers(a, base, names):
        row = [a["datasets"], a.get("queries", "-"), f(a["first_stage"]), f(a["reranked"]),
               f"{a['reranked'] - a['first_stage']:+.4f}", interval(a.get("gain_ci95"))]
        if baseline is not None:  # the baseline's reranked number over the same datasets, and this run's gain on it
            row += [f(base["reranked"]), f"{a['reranked'] - base['reranked']:+.4f}",
                    interval(vs_baseline(results, b, names))] if base else ["-", "-", "-"]
        return row + [f(a["ceiling"]), a["skipped"]]
    of = lambda field, value: [n for n, r in datasets.items() if r[field] == value]
    tail = ["datasets", "queries", "first stage", "reranked", "gain", "95% CI",
            *(["baseline", "vs baseline", "95% CI"] if baseline else []), ceil, "skipped"]
    out += ["", "Per task type (macro mean over its datasets)",
            table(["task", "group", *tail], [[t, TASK_GROUP[t], *numbers(a, b.get("tasks", {}).get(t), of("task", t))]
                                             for t, a in results["tasks"].items()]),
            "", "Per group and overall (macro mean over datasets, as MRB)",
            table(["group", *tail], [[g, *numbers(a, base, names)] for g, a, base, names in [
                *[(g, a, b.get("groups", {}).get(g), of("group", g)) for g, a in results["groups"].items()],
                ("overall", results["overall"], b.get("overall"), list(datasets))]])]
    if baseline is not None:
        same = sorted(baseline.get("datasets", {})) == sorted(datasets)
        out += [f"baseline: {baseline.get('config', {}).get('model', '?')} (reranked); vs baseline = this run's "
                "reranked - the baseline's" +
                ("" if same else "; NOTE: it was evaluated on other datasets, so its means are not comparable")]
    skipped = [m for r in datasets.values() for m in r["skipped_items"]]
    if skipped:
        out += ["", f"{len(skipped)} skipped item(s) (--on-error skip):"] + [f"  {m}" for m in skipped[:10]]
        out += [f"  ... and {len(skipped) - 10} more (all listed in --json)"] if len(skipped) > 10 else []
    return "\n".join(out + ["", verdict(results, "/".join(main))])


def verdict(results, metric):
    """One short paragraph: did reranking improve on the first stage, by how much, how sure, on which tasks."""
    o = results["overall"]
    gain, ci = o["reranked"] - o["first_stage"], o.get("gain_ci95")
    sure = "" if ci is None else (" (clearly better)" if ci[0] > 0 else " (clearly worse)" if ci[1] < 0 else
                                  " (not clearly different from zero)")
    by = {"better": [], "worse": [], "unclear": []}
    for t, a in results["tasks"].items():
        c = a.get("gain_ci95")
        by["unclear" if c is None or c[0] <= 0 <= c[1] else "better" if c[0] > 0 else "worse"].append(t)
    return (f"Verdict: reranking moved {metric} from {o['first_stage']:.3f} (first stage) to {o['reranked']:.3f}, "
            f"{gain:+.3f} overall, 95% CI {interval(ci)}{sure}, over {o.get('queries', '?')} queries in "
            f"{o['datasets']} dataset(s). Per task, interval above zero: {', '.join(by['better']) or 'none'}; below "
            f"zero: {', '.join(by['worse']) or 'none'}; unclear: {', '.join(by['unclear']) or 'none'}.")


def read_baseline(path, top_k):
    """The results of an earlier `eval.py --json` run, for report()'s baseline column; clear errors otherwise."""
    try:
        baseline = read_json(path, hint="; write it with eval.py --json")
    except ValueError as e:
        raise ValueError(f"--baseline {e}") from None
    numbers = lambda a: isinstance(a, dict) and isinstance(a.get("reranked"), (int, float))  # noqa: E731
    if not isinstance(baseline, dict) or not numbers(baseline.get("overall")):
        raise ValueError(f"--baseline {path}: not an eval.py --json result (no 'overall' numbers)")
    for key in ("tasks", "groups", "datasets", "config"):
        value = baseline.get(key, {})
        if not isinstance(value, dict) or key in ("tasks", "groups") and not all(map(numbers, value.values())):
            raise ValueError(f"--baseline {path}: '{key}' is not what eval.py --json writes: expected an object"
                             + (" of objects with a 'reranked' number" if key in ("tasks", "groups") else ""))
    if baseline.get("config", {}).get("top_k") != top_k:
        print(f"note: --baseline {path} was reranked at depth {baseline.get('config', {}).get('top_k')}, "
              f"this run at {top_k}", file=sys.stderr)
    return baseline
