"""Training curves from train.py output folders, drawn as PNG: the mean weights W+ and W- per step (the mechanism of
GMR §4: under the contrastive weight both collapse together once the positive's yes logit dominates its group,
while the SFT weight stays per document), the SFT loss, and --eval-every's held-out metric.

    python -m minigmr.plot runs/sft runs/infonce --out curves.png

matplotlib is an optional extra (`pip install -e ".[plot]"`), imported here only, when a figure is drawn.
"""
import argparse
import json
import os

import numpy as np


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit('plotting needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def read_log(folder: str) -> list:
    """The lines of folder/log.jsonl; errors name the file and line."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{folder}: no log.jsonl (not a train.py output folder)")
    lines = []
    with open(path) as f:
        for n, raw in enumerate(f, 1):
            try:
                lines.append(json.loads(raw))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
    return lines


def mean_curve(logs: list, key: str) -> tuple:
    """(steps, mean over the logs of `key` at each step that every log has): one curve for several seeds."""
    per_log = [{line["step"]: line[key] for line in log if line.get(key) is not None} for log in logs]
    steps = sorted(set.intersection(*(set(p) for p in per_log))) if per_log else []
    return np.asarray(steps), np.asarray([np.mean([p[s] for p in per_log]) for s in steps])


def smooth(y: np.ndarray, k: int) -> np.ndarray:
    """Trailing moving average over k points (the first points over fewer): curves of noisy per-step values."""
    if k <= 1 or len(y) == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    return (c[idx] - c[np.maximum(idx - k, 0)]) / (idx - np.maximum(idx - k, 0))


def val_key(logs: list):
    return next((k for log in logs for line in log for k in line if k.startswith("val_") and k != "val_queries"), None)


def draw_curves(curves: dict, out: str, k: int = 25, title: str = "") -> str:
    """curves {label: [log, ...]} (one log per seed) -> a PNG with panels W+ / W- (mean over seeds, smoothed over k
    steps), SFT loss and, if logged, the held-out metric."""
    plt = pyplot()
    key = val_key([log for logs in curves.values() for log in logs])
    fig, axes = plt.subplots(1, 3 if key else 2, figsize=(16 if key else 11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = colours if len(curves) <= len(colours) else [plt.get_cmap("tab20")(i % 20) for i in range(len(curves))]
    for i, (label, logs) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        for field, style in (("w_pos", "-"), ("w_neg", "--")):
            x, y = mean_curve(logs, field)
            axes[0].plot(x, smooth(y, k), style, color=colour, label=label if field == "w_pos" else None)
        x, y = mean_curve(logs, "sft_loss")
        axes[1].plot(x, smooth(y, k), color=colour, label=label)
        if key:
            x, y = mean_curve(logs, key)
            axes[2].plot(x, y, "o-", color=colour, label=label)
    axes[0].set(title="mean weight per document (W+ solid, W- dashed)", xlabel="step", ylabel="W", yscale="log")
    axes[1].set(title="SFT loss (sum over a group's documents)", xlabel="step", ylabel="loss", yscale="log")
    if key:
        axes[2].set(title=f"held-out {key[4:]}", xlabel="step", ylabel=key[4:])
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               title="cell (colour)")  # one legend for every panel, outside them
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")  # tight: the legend outside the axes is kept
    plt.close(fig)
    return out


def draw_negatives(points: dict, out: str, metric: str = "nDCG@10") -> str:
    """points {curve label: [(N, estimate, low, high), ...]} -> a PNG of the metric against N with 95% intervals."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for label, rows in points.items():
        rows = sorted(rows)
        n, est = [r[0] for r in rows], np.asarray([r[1] for r in rows])
        err = np.asarray([[e - r[2] for r, e in zip(rows, est)], [r[3] - e for r, e in zip(rows, est)]])
        ax.errorbar(n, est, yerr=err, marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="negatives N per query", ylabel=metric, title=f"{metric} against N (95% intervals)")
    ax.set_xticks(sorted({r[0] for rows in points.values() for r in rows}))
    ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Draw W+ / W-, the SFT loss and the held-out metric of train.py runs.")
    p.add_argument("runs", nargs="+", help="train.py output folders (each with a log.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: %(default)s)")
    p.add_argument("--smooth", type=int, default=25, help="moving-average window in steps (default: %(default)s)")
    a = p.parse_args(argv)
    if a.smooth < 1:
        p.error(f"--smooth must be >= 1, got {a.smooth}")
    try:
        names = [os.path.basename(os.path.normpath(r)) for r in a.runs]
        labels = names if len(set(names)) == len(names) else a.runs  # same folder names: label by path
        curves = {label: [read_log(r)] for label, r in zip(labels, a.runs)}
    except ValueError as e:
        p.error(str(e))
    print(draw_curves(curves, a.out, a.smooth))


if __name__ == "__main__":
    main()
