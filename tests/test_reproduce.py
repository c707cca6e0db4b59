"""The paper in miniature (reproduce.py, minigmr/reproduction.py, minigmr/plot.py):

  - verdicts follow from the intervals only: above 0 reproduced, below 0 reversed, straddling 0 inconclusive; fed
    runs whose cells differ clearly, and runs whose difference is symmetric noise
  - a contrast's estimate is the macro mean over datasets of the per-seed, per-query values; its interval pairs
    cells on the same seeds and queries; missing seeds or other queries are errors naming the run
  - the whole command at toy size (2 steps, 1 seed) writes the table, the figure and the raw runs; a second call
    trains nothing; --rebuild gives the same summary
  - python -m minigmr.plot draws any train.py folder's curves
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minigmr import plot, reproduction
from minigmr.synth import generate_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "reproduce.py"))
reproduce_script = importlib.util.module_from_spec(_spec)  # a script at the repository root, not a package module
_spec.loader.exec_module(reproduce_script)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def fake_runs(values, seeds=(0, 1, 2), datasets=("a", "b"), queries=12):
    """Runs whose per-query metric is values[cell](seed, dataset index, query index)."""
    return [{"cell": cell, "seed": s, "per_query": {ds: {f"q{q:02d}": f(s, i, q) for q in range(queries)}
                                                    for i, ds in enumerate(datasets)}}
            for cell, f in values.items() for s in seeds]


@pytest.mark.parametrize("ci, expected", [([0.01, 0.2], "reproduced"), ([-0.3, -0.001], "not reproduced (reversed)"),
                                          ([-0.1, 0.1], "inconclusive at this resolution"),
                                          ([0.0, 0.1], "inconclusive at this resolution")])
def test_verdict_follows_from_the_interval(ci, expected):
    assert reproduction.verdict(ci) == expected


def test_contrast_estimate_interval_and_verdicts_on_known_runs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, (3, 2, 12))  # (seed, dataset, query)
    noise = rng.normal(0, 0.05, (3, 2, 12))
    runs = fake_runs({"A": lambda s, d, q: base[s, d, q] + 0.2, "B": lambda s, d, q: base[s, d, q],
                      "C": lambda s, d, q: base[s, d, q] + noise[s, d, q] - noise[s, d, q].mean()})
    clear = reproduction.contrast(runs, {"A": 1, "B": -1})
    assert clear["estimate"] == pytest.approx(0.2) and clear["seeds"] == [0, 1, 2] and clear["queries"] == 24
    assert clear["ci95"] == pytest.approx([0.2, 0.2])  # the paired difference is exactly 0.2 everywhere
    assert reproduction.verdict(clear["ci95"]) == "reproduced"
    assert reproduction.verdict(reproduction.contrast(runs, {"B": 1, "A": -1})["ci95"]) == "not reproduced (reversed)"
    tie = reproduction.contrast(runs, {"C": 1, "B": -1})  # zero-mean noise per seed: the interval straddles 0
    assert tie["ci95"][0] < 0 < tie["ci95"][1] and reproduction.verdict(tie["ci95"]) == "inconclusive at this resolution"
    single = reproduction.contrast(runs, {"B": 1})
    assert single["estimate"] == pytest.approx(base.mean())  # equal-sized datasets: macro mean = grand mean
    assert single["ci95"][0] < single["estimate"] < single["ci95"][1]
    assert single["seed_sd"] == pytest.approx(base.mean(axis=(1, 2)).std(ddof=1))
    assert reproduction.contrast(runs, {"A": 1, "missing": -1}) is None  # a cell without runs: no finding


def test_a_missing_seed_or_other_queries_is_an_error_naming_the_run():
    runs = fake_runs({"A": lambda s, d, q: 0.5, "B": lambda s, d, q: 0.4})
    with pytest.raises(ValueError, match=r"cell 'A': no run for seed\(s\) \[7\]"):
        reproduction.grid(runs, "A", [0, 7])
    del runs[1]["per_query"]["b"]["q03"]
    with pytest.raises(ValueError, match=r"run 'A' seed 1: dataset 'b' has other queries than seed 0's"):
        reproduction.contrast(runs, {"A": 1, "B": -1})


def test_summary_computes_every_finding_whose_cells_ran():
    n = 4
    cells = reproduction.plan("full", n, (1, 4))
    assert len(cells) == 4 + 2 + 2  # Table 1, Table 2's two extra cells, Figure 5 at N=1 (N=4 is Table 1's)
    runs = fake_runs({c: (lambda s, d, q, k=k: 0.1 * k + 0.01 * q) for k, c in enumerate(cells)})
    summary = reproduction.summarise(runs, n, (1, 4))
    assert len(summary["findings"]) == 9
    for f in summary["findings"]:
        assert f["verdict"] == reproduction.verdict(f["ci95"])
        expected = sum(coef * 0.1 * list(cells).index(c) for c, coef in f["cells"].items())
        assert f["estimate"] == pytest.approx(expected)
    quick = reproduction.summarise([r for r in runs if r["cell"] in reproduction.plan("quick", n)], n, (1, 4))
    assert len(quick["findings"]) == 4  # Table 2 and Figure 5 need cells the quick mode does not run
    with_two = {name: cells for name, cells, _ in reproduction.findings(n, (1, 2, 4, 8))}  # the paper's range too
    assert len(with_two) == 10 and with_two["SFT improves over the paper's range of N (N=8 - N=2)"] == {
        reproduction.cell_name("sft", "sft", 8): 1, reproduction.cell_name("sft", "sft", 2): -1}


def test_full_mode_figures_draw_the_weights_and_the_negatives_curve(tmp_path):
    pytest.importorskip("matplotlib")
    cells = reproduction.plan("full", 4, (1, 4))
    runs = fake_runs({c: (lambda s, d, q, k=k: 0.1 * k + 0.01 * q) for k, c in enumerate(cells)})
    for r in runs:
        r.update(dict(zip(("weight", "direction", "negatives", "tau"), cells[r["cell"]])))
        r["log"] = [{"step": k, "sft_loss": 2.0 / k, "w_pos": 0.8 / k, "w_neg": 0.2 / k} for k in (1, 2, 3)]
    summary = reproduction.summarise(runs, 4, (1, 4))
    made = reproduce_script.figures(argparse.Namespace(out=str(tmp_path)), runs, summary)
    assert [os.path.basename(m) for m in made] == ["weights.png", "negatives.png"]
    assert all(open(m, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for m in made)


def test_smooth_is_a_trailing_moving_average():
    np.testing.assert_allclose(plot.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(plot.smooth(np.array([2.0, 4.0]), 1), [2.0, 4.0])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # the embedder first stage (2 steps): run.trec is the embedder's, run.attributes.trec the second candidate set
    return generate_world(str(tmp_path_factory.mktemp("world")), n_eval_queries=2, n_candidates=10, n_train=24,
                          pretrain_steps=0, embed_steps=2)


def reproduce(world, out, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "reproduce.py"), "--steps", "2", "--seeds", "1", "--workers", "2",
           "--eval-every", "1", "--model", world["checkpoint"], "--data", world["train"], "--suite-dir",
           world["suite"], "--out", str(out), *extra]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_the_command_end_to_end_at_toy_size(world, tmp_path):
    out = tmp_path / "rep"
    reproduce(world, out, "--second-candidates", "--", "--lr", "1e-3")
    runs = sorted(os.listdir(out / "runs"))
    assert runs == ["W_CL_D_CL_N4-seed0.json", "W_CL_D_SFT_N4-seed0.json", "W_SFT_D_CL_N4-seed0.json",
                    "W_SFT_D_SFT_N4-seed0.json", "untrained-seed0.json"]
    assert not (out / "work").exists()  # checkpoints deleted once their numbers are kept
    raw = json.loads((out / "runs" / runs[-2]).read_text())
    assert raw["weight"] == raw["direction"] == "sft" and raw["negatives"] == 4 and raw["seed"] == 0
    assert [x["step"] for x in raw["log"]] == [1, 2] and "val_ndcg@10" in raw["log"][-1]
    assert sum(len(q) for q in raw["per_query"].values()) == 18  # 9 datasets x 2 queries, each one number
    assert "--lr" in raw["config"]["train"] and "1e-3" in raw["config"]["train"]
    untrained = json.loads((out / "runs" / runs[-1]).read_text())
    assert untrained["log"] == [] and untrained["config"]["train"] == [] and world["checkpoint"] in \
        untrained["config"]["eval run.trec"]  # the starting checkpoint, evaluated as it is
    # every run is evaluated twice: on run.trec (the embedder's) and on run.attributes.trec's candidates
    also = raw["also"]["run.attributes.trec"]
    assert set(also["per_query"]) == set(raw["per_query"]) and also["first_stage"] != raw["first_stage"]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["findings"]) == 4 and len(summary["cells"]) == 4
    first_stage = [v for ds in untrained["first_stage"].values() for v in ds.values()]
    assert summary["reference"]["first stage (the candidates' order)"]["estimate"] == \
        pytest.approx(np.mean(first_stage))  # 2 queries in each dataset: the macro mean is the plain mean
    for f in summary["findings"]:
        assert f["verdict"] == reproduction.verdict(f["ci95"])
    table = (out / "results.md").read_text()
    assert "| W_SFT+D_SFT N=4 | 1 |" in table and "58.09" in table
    assert "## Reranking the candidates of run.attributes.trec" in table and len(summary["also"]) == 1
    assert all(f"**{f['verdict']}**" in table for f in summary["findings"])
    pytest.importorskip("matplotlib")
    assert (out / "weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same command again trains nothing (every run's JSON is there), and --rebuild gives the same numbers
    mtimes = {f: os.path.getmtime(out / "runs" / f) for f in runs}
    again = reproduce(world, out, "--second-candidates", "--", "--lr", "1e-3")
    assert "runs: 100%" in again.stderr and {f: os.path.getmtime(out / "runs" / f) for f in runs} == mtimes
    reproduce(world, out, "--rebuild")
    rebuilt = json.loads((out / "summary.json").read_text())
    assert rebuilt["findings"] == summary["findings"] and rebuilt["cells"] == summary["cells"]


def test_other_settings_in_the_same_folder_are_refused(world, tmp_path):
    out = tmp_path / "rep"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "W_SFT_D_SFT_N4-seed0.json").write_text(json.dumps({"config": {"train": ["--steps", "99"]}}))
    cmd = [sys.executable, os.path.join(ROOT, "reproduce.py"), "--steps", "2", "--seeds", "1", "--workers", "1",
           "--model", world["checkpoint"], "--data", world["train"], "--suite-dir", world["suite"], "--out", str(out)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "W_SFT_D_SFT_N4-seed0.json was made with other settings" in r.stderr


def test_plot_command_draws_a_train_folder(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "sft"
    run.mkdir()
    lines = [{"step": k, "sft_loss": 3.0 / k, "w_pos": 0.5 / k, "w_neg": 0.2 / k, **({"val_ndcg@10": 0.1 * k}
             if k % 2 == 0 else {})} for k in range(1, 7)]
    (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    png = tmp_path / "curves.png"
    plot.main([str(run), "--out", str(png), "--smooth", "2"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (run / "log.jsonl").write_text('{"step": 1}\n{"step": \n')
    with pytest.raises(SystemExit):  # argparse error naming the file and line
        plot.main([str(run), "--out", str(png)])
