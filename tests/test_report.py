"""report.py's paired interval: a macro mean over datasets of per-query differences, resampled within each dataset;
and the verdict that reads it."""
import numpy as np
import pytest

from minigmr.report import aggregate, paired_interval, verdict


def test_constant_differences_give_a_point_and_datasets_weigh_one_each():
    assert paired_interval([[0.25] * 7]) == [0.25, 0.25]
    # macro mean: (1 + 0) / 2 whatever the number of queries per dataset
    assert paired_interval([[1.0] * 3, [0.0] * 11]) == [0.5, 0.5]
    assert paired_interval([[0.1, 0.2], []]) is None and paired_interval([]) is None


def test_interval_is_the_percentiles_of_resampled_macro_means():
    """The same draws written out as a loop: per resample, each dataset's queries drawn with replacement."""
    rng = np.random.default_rng(3)
    diffs = [rng.normal(0.1, 0.3, 24), rng.normal(-0.05, 0.2, 10)]
    draws, want = np.random.default_rng(0), np.zeros(500)
    for d in diffs:
        idx = draws.integers(0, len(d), (500, len(d)))
        for b in range(500):
            want[b] += sum(d[i] for i in idx[b]) / len(d)
    low, high = np.percentile(want / 2, [2.5, 97.5])
    assert paired_interval(diffs, n=500, seed=0) == pytest.approx([low, high], abs=1e-12)
    assert low < (diffs[0].mean() + diffs[1].mean()) / 2 < high


def test_verdict_names_the_tasks_by_their_interval():
    def dataset(task, first, reranked):
        return {"task": task, "group": "single-modal" if task in ("T->T", "I->I") else "cross-modal",
                "main_metric": "ndcg@10", "queries": len(first), "skipped": 0, "ceiling": 1.0,
                "first_stage": {"ndcg@10": float(np.mean(first))}, "reranked": {"ndcg@10": float(np.mean(reranked))},
                "per_query": {f"q{i}": [a, b] for i, (a, b) in enumerate(zip(first, reranked))}}
    per = {"a": dataset("T->T", [0.1] * 5, [0.5] * 5), "b": dataset("I->I", [0.6] * 5, [0.2] * 5),
           "c": dataset("T->I", [0.2, 0.4, 0.3], [0.4, 0.2, 0.3])}
    results = {"datasets": per, **aggregate(per)}
    assert results["tasks"]["T->T"]["gain_ci95"] == pytest.approx([0.4, 0.4])
    text = verdict(results, "ndcg@10")
    assert "interval above zero: T->T; below zero: I->I; unclear: T->I." in text
    assert "over 13 queries in 3 dataset(s)" in text and "from 0.333 (first stage) to 0.333, +0.000 overall" in text
