"""Smoke test of the top-level `bench.py`: a tiny model, a quarter of the candidates, one repetition, all four
workloads. No timed assertions: it checks that the run completes, that the JSON report has every field, and that
minigmr's scores equal transformers' on the same weights (the bench's own parity check, <= 1e-4 in fp32)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).resolve().parents[1] / "bench.py")
bench = importlib.util.module_from_spec(_spec)  # a script at the repository root, not a package module
_spec.loader.exec_module(bench)

TOP_FIELDS = {"config", "device", "dtype", "threads", "load_average", "torch", "transformers", "tokenizer",
              "batch_size", "repeats", "quick", "image_side", "matmul_peak_flops_per_s", "memory_method",
              "workloads"}
WORKLOAD_FIELDS = {"what", "unit", "n", "minigmr", "transformers", "speedup", "max_abs_score_diff", "minimal_flops",
                   "achieved_flops_per_s", "fraction_of_peak", "matmul_peak_flops_per_s", "minigmr_vs_fp32"}
IMPL_FIELDS = {"times_s", "median_s", "rate", "peak_mem_mb"}


def test_bench_tiny_all_workloads(tmp_path, capsys):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: a tiny model is all small ops, which two threads on a busy 2-core machine make crawl
        bench.main(["--config", "tiny", "--quick", "--repeats", "1", "--threads", "1", "--dtype", "float32",
                    "--workdir", str(tmp_path / "w"), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # bench.main sets it process-wide
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert set(res) == TOP_FIELDS and res["config"] == "tiny" and res["dtype"] == "float32"
    assert res["matmul_peak_flops_per_s"] > 0 and res["threads"] == 1
    assert set(res["workloads"]) == {"W1", "W2", "W3", "W4"}
    for name, w in res["workloads"].items():
        assert set(w) == WORKLOAD_FIELDS, name
        assert name in table
        for impl in ("minigmr", "transformers"):
            r = w[impl]
            assert set(r) == IMPL_FIELDS and len(r["times_s"]) == 1 and r["rate"] > 0, (name, impl)
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0, (name, impl)
        assert w["unit"] == ("steps" if name == "W4" else "pairs")
        assert w["n"] == {"W1": 25, "W2": 8, "W3": 16, "W4": 1}[name]  # --quick: a quarter of 100 / 32 / 64
        assert w["minimal_flops"] > 0 and w["speedup"] > 0 and len(w["matmul_peak_flops_per_s"]) == 1
        assert w["max_abs_score_diff"] <= 1e-4, (name, w["max_abs_score_diff"])  # same weights, fp32
        assert w["minigmr_vs_fp32"] is None  # already fp32: nothing to compare


def test_agreement_of_two_score_lists():
    a = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert bench.agreement(a, a.clone(), k=2) == dict(max_abs_diff=0.0, kendall_tau=1.0, top_k_overlap=1.0)
    r = bench.agreement(a, a.flip(0), k=2)  # the reverse order
    assert r["kendall_tau"] == -1.0 and r["top_k_overlap"] == 0.0 and r["max_abs_diff"] == pytest.approx(0.3)
    tied = bench.agreement(torch.tensor([0.9, 0.9, 0.7, 0.6]), a, k=2)  # one tie (bf16-like), 5 concordant pairs
    assert tied["kendall_tau"] == pytest.approx(5 / (5 * 6) ** 0.5) and tied["top_k_overlap"] == 1.0
