"""The result tables eval.py prints and the macro means they show, MRB style (arXiv 2510.14824; docs/gmr.md §4).

aggregate() turns the per-dataset numbers into macro means of each dataset's main metric (every dataset weighs 1,
as MRB averages) per task type, per group (single-, cross-, fused-modal) and overall; report() prints them next to
the first stage, the recall ceiling and, optionally, a baseline run read by read_baseline() from an eval.py --json.
"""
import sys

from .data import TASK_GROUP, TASK_TYPES, read_json

GROUPS = ("single-modal", "cross-modal", "fused-modal")


def aggregate(per_dataset):
    """Macro means over datasets of the main metric (first stage, reranked) and of the ceiling."""
    def mean(names):
        rows = [per_dataset[n] for n in names]
        avg = lambda get: sum(get(r) for r in rows) / len(rows)
        return {"datasets": len(rows), "first_stage": avg(lambda r: r["first_stage"][r["main_metric"]]),
                "reranked": avg(lambda r: r["reranked"][r["main_metric"]]), "ceiling": avg(lambda r: r["ceiling"]),
                "skipped": sum(r["skipped"] for r in rows)}
    select = lambda field, value: [n for n, r in per_dataset.items() if r[field] == value]
    return {"tasks": {t: mean(select("task", t)) for t in TASK_TYPES if select("task", t)},
            "groups": {g: mean(select("group", g)) for g in GROUPS if select("group", g)},
            "overall": mean(list(per_dataset))}


def table(header, rows):
    """Plain-text columns, left-aligned, two spaces apart."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows])


def report(results, top_k, metrics, baseline=None):
    """The printed tables: per dataset (main metric, then every metric), per task type, per group and overall.
    baseline: the results of another run (eval.py --json) whose reranked numbers get their own column."""
    f, delta = (lambda x: f"{x:.4f}"), (lambda a, b: f"{b - a:+.4f}")
    ceil, datasets = f"ceiling@{top_k}", results["datasets"]
    rows = []
    for n, r in datasets.items():
        first, reranked = r["first_stage"][r["main_metric"]], r["reranked"][r["main_metric"]]
        rows.append([n, r["task"], r["queries"], r["skipped"], r["main_metric"], f(first), f(reranked),
                     delta(first, reranked), f(r["ceiling"])])
    out = [f"Per dataset: main metric, first stage -> reranked (depth {top_k}); {ceil} = first-stage recall@{top_k}",
           table(["dataset", "task", "queries", "skipped", "main", "first", "reranked", "delta", ceil], rows),
           "", "Per dataset, every metric: first stage -> reranked",
           table(["dataset", *metrics], [[n, *(f"{f(r['first_stage'][m])} -> {f(r['reranked'][m])}" for m in metrics)]
                                        for n, r in datasets.items()])]
    def numbers(a, base):
        row = [a["datasets"], f(a["first_stage"]), f(a["reranked"]), delta(a["first_stage"], a["reranked"])]
        if baseline is not None:  # the baseline's reranked number over the same datasets, and the gain over it
            row += [f(base["reranked"]), delta(base["reranked"], a["reranked"])] if base else ["-", "-"]
        return row + [f(a["ceiling"]), a["skipped"]]
    b = baseline or {}
    tail = ["datasets", "first", "reranked", "delta", *(["baseline", "vs base"] if baseline else []), ceil, "skipped"]
    out += ["", "Per task type (macro mean of the datasets' main metric)",
            table(["task", "group", *tail], [[t, TASK_GROUP[t], *numbers(a, b.get("tasks", {}).get(t))]
                                             for t, a in results["tasks"].items()]),
            "", "Per group and overall (macro mean over datasets, as MRB)",
            table(["group", *tail], [[g, *numbers(a, base)] for g, a, base in [
                *[(g, a, b.get("groups", {}).get(g)) for g, a in results["groups"].items()],
                ("overall", results["overall"], b.get("overall"))]])]
    if baseline is not None:
        same = sorted(baseline.get("datasets", {})) == sorted(datasets)
        out += [f"baseline: {baseline.get('config', {}).get('model', '?')} (reranked)" +
                ("" if same else "; NOTE: it was evaluated on other datasets, so its means are not comparable")]
    skipped = [m for r in datasets.values() for m in r["skipped_items"]]
    if skipped:
        out += ["", f"{len(skipped)} skipped item(s) (--on-error skip):"] + [f"  {m}" for m in skipped[:10]]
        out += [f"  ... and {len(skipped) - 10} more (all listed in --json)"] if len(skipped) > 10 else []
    return "\n".join(out)


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
