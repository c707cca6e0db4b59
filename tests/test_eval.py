"""eval.py: its numbers against independent computations (pytrec_eval for the first stage, metrics.evaluate on a
reranked run built here), macro averages, resume after an interruption, error/skip handling, the command line on
the real tiny checkpoints (minigmr's synthetic one and a transformers-saved one), and tools/beir_to_suite.py."""
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytrec_eval
from hf_reference import save_tiny_hf
from oracles import make_tiny_tokenizer_dir, write_preprocessor_config
from PIL import Image

from minigmr import synth
from minigmr.data import Item, load_suite, write_dataset
from minigmr.embedding import Embedder, search
from minigmr.metrics import evaluate, read_run
from minigmr.report import read_baseline, report
from minigmr.scoring import Reranker

ROOT = Path(__file__).resolve().parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ev = _load("minigmr_eval", ROOT / "eval.py")
beir = _load("beir_to_suite", ROOT / "tools" / "beir_to_suite.py")
METRICS = ["ndcg@10", "recall@10", "mrr@10", "map"]


# ---------------------------------------------------------------------------------------------------- fixtures
class FakeReranker:
    """Reranker.score's signature; the score is a hash of (instruction, query, document), so the test knows it.
    Opens images like the real one (so a broken file fails), counts calls, and can fail after `fail_after` calls."""

    score_type = "sft"  # what Reranker reports (eval.py prints it and keys its cache on it)

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    @staticmethod
    def value(instruction, query, doc):
        digest = hashlib.sha256(json.dumps([instruction, query, doc], sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:4], "big") / 2 ** 32

    def score(self, query, documents, instruction="", batch_size=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated interruption")
        self.calls += 1
        for x in [query, *documents]:
            if "image" in x:
                with Image.open(x["image"]) as im:
                    im.load()
        return [self.value(instruction, query, d) for d in documents]


def make_dataset(root, name, task, main_metric, seed, image_queries=False, image_docs=False, n_q=6, n_docs=14,
                 n_cands=8):
    """A small random dataset: graded qrels (incl. a relevant doc outside the corpus and a query with no relevant
    doc), a run of n_cands candidates per query with a tie, optional images."""
    rng, root = random.Random(seed), Path(root) / name
    (root / "images").mkdir(parents=True, exist_ok=True)

    def item(kind, i, with_image):
        image = None
        if with_image:
            image = f"images/{kind}{i}.png"
            Image.new("RGB", (28 + 4 * i, 28), (rng.randrange(256), 80, 160)).save(root / image)
        return Item(f"{kind}{i}", f"{name} {kind} {i}", image)

    corpus = [item("d", i, image_docs) for i in range(n_docs)]
    queries = [item("q", i, image_queries) for i in range(n_q)]
    ids = [d.id for d in corpus]
    qrels = {q.id: {d: rng.choice([1, 2]) for d in rng.sample(ids, rng.randint(1, 3))} for q in queries[:-1]}
    qrels[queries[0].id]["ghost"] = 1  # relevant but not in the corpus: lowers the ceiling
    qrels[queries[-1].id] = {ids[0]: 0}  # judged, nothing relevant: not evaluated
    run = {q.id: {d: round(rng.uniform(0, 10), 1) for d in rng.sample(ids, n_cands)} for q in queries}
    tied = list(run[queries[1].id])[:3]
    run[queries[1].id].update({d: 5.0 for d in tied})
    return write_dataset(root, name=name, task=task, instruction=f"instruction of {name}", main_metric=main_metric,
                         queries=queries, corpus=corpus, qrels=qrels, run=run)


@pytest.fixture()
def suite(tmp_path):
    root = tmp_path / "suite"
    make_dataset(root, "a_t2t", "T->T", "ndcg@10", 1)
    make_dataset(root, "b_t2t", "T->T", "mrr@10", 2)
    make_dataset(root, "c_i2i", "I->I", "map", 3, image_queries=True, image_docs=True)
    make_dataset(root, "d_t2i", "T->I", "recall@5", 4, image_docs=True)
    make_dataset(root, "e_it2it", "IT->IT", "ndcg@10", 5, image_queries=True, image_docs=True)
    return root


def read_trec(path, cols):
    """qrels/run file -> {qid: {docid: value}} for pytrec_eval (no minigmr code)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if f:
            out.setdefault(f[0], {})[f[2]] = int(f[3]) if cols == 4 else float(f[4])
    return out


def expected_reranked(ds, score_of, top_k):
    """The reranked run built independently: top-k by score_of, the rest in first-stage order below them."""
    run = {}
    for qid, scores in read_trec(Path(ds.root) / "run.trec", 6).items():
        order = sorted(scores, key=lambda d: (scores[d], d), reverse=True)  # trec_eval: ties by docid descending
        run[qid] = {d: score_of(qid, d) for d in order[:top_k]}
        run[qid].update({d: -1.0 - i for i, d in enumerate(order[top_k:])})
    return {q: run.get(q, {}) for q in ds.queries}


def fake_score_of(ds):
    item = lambda x: {k: v for k, v in (("text", x.text), ("image", x.image)) if v is not None}
    return lambda q, d: FakeReranker.value(ds.instruction, item(ds.queries[q]), item(ds.corpus[d]))


def mean_over_judged(per_query, qrels, measure):
    """pytrec_eval reports 0 for a query with no relevant doc; minigmr skips it (metrics.py docstring)."""
    vals = [per_query[q][measure] for q in per_query if any(r > 0 for r in qrels.get(q, {}).values())]
    return sum(vals) / len(vals)


# ---------------------------------------------------------------------------------------------------- numbers
def test_numbers_equal_independent_computation(suite):
    top_k = 5  # < 8 candidates: the tail below the depth is exercised
    datasets = load_suite(suite)
    results = ev.evaluate_suite(datasets, FakeReranker(), top_k=top_k, metrics=METRICS, progress=False)
    pytrec_names = {"ndcg@10": "ndcg_cut_10", "recall@10": "recall_10", "mrr@10": "recip_rank", "map": "map"}
    for ds in datasets:
        got = results["datasets"][ds.name]
        # reranked: metrics.evaluate on the run rebuilt here from the scores the fake reranker gives
        want = evaluate(ds.qrels, expected_reranked(ds, fake_score_of(ds), top_k), METRICS + [ds.main_metric])
        for m in want:  # same ranking -> the same floats; rel=1e-12 only guards summation order
            assert got["reranked"][m] == pytest.approx(want[m], rel=1e-12), (ds.name, m)
        # first stage: pytrec_eval on run.trec as is (8 candidates < 10, so recip_rank = mrr@10)
        qrels, run = read_trec(Path(ds.root) / "qrels.tsv", 4), read_trec(Path(ds.root) / "run.trec", 6)
        per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.10", "recall.5", "recip_rank",
                                                           "map"}).evaluate(run)
        for m, p in pytrec_names.items():
            assert got["first_stage"][m] == pytest.approx(mean_over_judged(per_query, qrels, p), rel=1e-12)
        assert got["ceiling"] == pytest.approx(mean_over_judged(per_query, qrels, "recall_5"), rel=1e-12)
        assert got["queries"] == 5 and got["skipped"] == 0
    assert results["datasets"]["a_t2t"]["ceiling"] < 1  # the "ghost" relevant doc is out of reach

    # aggregation: macro means over datasets of each dataset's own main metric
    main = {n: (r["first_stage"][r["main_metric"]], r["reranked"][r["main_metric"]], r["ceiling"])
            for n, r in results["datasets"].items()}
    mean = lambda names, i: sum(main[n][i] for n in names) / len(names)
    groups = {("tasks", "T->T"): ["a_t2t", "b_t2t"], ("tasks", "I->I"): ["c_i2i"], ("tasks", "T->I"): ["d_t2i"],
              ("tasks", "IT->IT"): ["e_it2it"], ("groups", "single-modal"): ["a_t2t", "b_t2t", "c_i2i"],
              ("groups", "cross-modal"): ["d_t2i"], ("groups", "fused-modal"): ["e_it2it"]}
    for (level, key), names in groups.items():
        agg = results[level][key]
        assert agg["datasets"] == len(names)
        for i, field in enumerate(("first_stage", "reranked", "ceiling")):
            assert agg[field] == pytest.approx(mean(names, i), rel=1e-12), (level, key, field)
    assert set(results["tasks"]) == {"T->T", "I->I", "T->I", "IT->IT"}
    # single-modal is the mean over its 3 datasets, not over its 2 task means
    assert results["groups"]["single-modal"]["reranked"] != pytest.approx(
        (results["tasks"]["T->T"]["reranked"] + results["tasks"]["I->I"]["reranked"]) / 2, rel=1e-9)
    for i, field in enumerate(("first_stage", "reranked", "ceiling")):
        assert results["overall"][field] == pytest.approx(mean(list(main), i), rel=1e-12)

    # the printed table shows these numbers on each dataset's row
    lines = report(results, top_k, METRICS).splitlines()
    for n, (first, reranked, ceiling) in main.items():
        row = next(line for line in lines if line.startswith(n + " "))
        assert f"{first:.4f}" in row and f"{reranked:.4f}" in row and f"{ceiling:.4f}" in row
    overall = next(line for line in lines if line.startswith("overall"))
    assert f"{results['overall']['reranked']:.4f}" in overall


def test_depth_covering_all_candidates_reranks_everything(suite):
    ds = load_suite(suite)[0]
    results = ev.evaluate_suite([ds], FakeReranker(), top_k=100, metrics=METRICS, progress=False)
    run = {q: {d: fake_score_of(ds)(q, d) for d in ds.run[q]} for q in ds.queries}
    assert results["datasets"][ds.name]["reranked"] == evaluate(ds.qrels, run, METRICS + [ds.main_metric])
    assert results["datasets"][ds.name]["ceiling"] == evaluate(ds.qrels, ds.run, ["recall@100"])["recall@100"]


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_rescores_only_missing_queries(suite, tmp_path):
    datasets = load_suite(suite)
    reference = ev.evaluate_suite(datasets, FakeReranker(), top_k=5, metrics=METRICS, progress=False)
    total = sum(len(ds.queries) for ds in datasets)
    cache, key = tmp_path / "cache", {"model": "fake"}

    first = FakeReranker(fail_after=8)  # dataset a: 6 queries, dataset b: 2 of 6, then "crash"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        ev.evaluate_suite(datasets, first, 5, METRICS, cache_dir=cache, reranker_key=key, progress=False)
    assert first.calls == 8
    # a crash in the middle of writing a line: a truncated record after the 2 complete ones of dataset b
    file_b = next(cache.glob("b_t2t-*.jsonl"))
    with open(file_b, "a") as f:
        f.write('{"qid": "q2", "scores": {"d1": 0.')

    second = FakeReranker()
    resumed = ev.evaluate_suite(datasets, second, 5, METRICS, cache_dir=cache, reranker_key=key, progress=False)
    assert second.calls == total - 8
    assert resumed == reference
    lines = file_b.read_text().splitlines()
    assert len(lines) == 1 + 6 and all(json.loads(line) for line in lines)  # header + 6 queries, no debris

    third = FakeReranker()  # everything cached now
    assert ev.evaluate_suite(datasets, third, 5, METRICS, cache_dir=cache, reranker_key=key,
                             progress=False) == reference
    assert third.calls == 0
    # another depth or another reranker key is another cache entry: everything is scored again
    for top_k, k in ((4, key), (5, {"model": "other"})):
        fourth = FakeReranker()
        ev.evaluate_suite(datasets, fourth, top_k, METRICS, cache_dir=cache, reranker_key=k, progress=False)
        assert fourth.calls == total


def test_corrupt_cache_line_is_an_error(suite, tmp_path):
    ds = load_suite(suite)[:1]
    ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, cache_dir=tmp_path / "c", reranker_key="k", progress=False)
    file = next((tmp_path / "c").glob("*.jsonl"))
    lines = file.read_text().splitlines()
    file.write_text("\n".join(lines[:2] + ["{oops"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=rf"{file.name}:3: malformed JSON .*delete the file to re-score"):
        ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, cache_dir=tmp_path / "c", reranker_key="k", progress=False)


# ---------------------------------------------------------------------------------------------------- errors
def run_main(monkeypatch, capsys, argv, reranker):
    """eval.main with Reranker.from_pretrained replaced by the given reranker."""
    monkeypatch.setattr(Reranker, "from_pretrained", classmethod(lambda cls, *a, **k: reranker))
    results = ev.main(argv)
    return results, capsys.readouterr().out


def test_missing_image_and_absent_candidate(suite, tmp_path, monkeypatch, capsys):
    (suite / "c_i2i" / "images" / "d3.png").unlink()
    with open(suite / "d_t2i" / "run.trec", "a") as f:
        f.write("q2 Q0 not_in_corpus 99 9.5 first_stage\n")
    base = ["--suite", "mrb", "--data-dir", str(suite), "--model", str(tmp_path), "--cache-dir", str(tmp_path / "c")]
    for name, pattern in (("c_i2i", r"dataset 'c_i2i': .*corpus.jsonl:4: id 'd3': image not found: .*d3.png"),
                          ("d_t2i", r"dataset 'd_t2i': .*run.trec:\d+: query 'q2': candidate 'not_in_corpus'")):
        with pytest.raises(ValueError, match=pattern):
            run_main(monkeypatch, capsys, base + ["--datasets", name], FakeReranker())

    results, out = run_main(monkeypatch, capsys, base + ["--on-error", "skip", "--top-k", "5"], FakeReranker())
    # data.py's skip list: one entry for the item with the missing image + one per run candidate it removes
    with_d3 = sum("d3" in docs for docs in read_trec(suite / "c_i2i" / "run.trec", 6).values())
    assert with_d3 > 0
    skipped = {n: r["skipped"] for n, r in results["datasets"].items()}
    assert skipped == {"a_t2t": 0, "b_t2t": 0, "c_i2i": 1 + with_d3, "d_t2i": 1, "e_it2it": 0}
    assert results["overall"]["skipped"] == 2 + with_d3
    row = next(line for line in out.splitlines() if line.startswith("c_i2i "))
    assert row.split()[2:4] == ["5", str(1 + with_d3)]  # queries, skipped
    assert f"{2 + with_d3} skipped item(s)" in out and "not_in_corpus" in out and "d3.png" in out


def test_unreadable_image(suite, tmp_path, monkeypatch, capsys):
    """A file that exists but cannot be decoded is only found when scoring: named, or skipped and counted."""
    good = (suite / "e_it2it" / "images" / "d5.png").read_bytes()
    (suite / "e_it2it" / "images" / "d5.png").write_bytes(b"not a png")
    ds = [d for d in load_suite(suite) if d.name == "e_it2it"]
    hits = [q for q in ds[0].queries if "d5" in ds[0].candidates(q)[:5]]
    assert hits  # the broken document is a candidate of some query
    with pytest.raises(ValueError, match=r"dataset 'e_it2it': query '\w+': candidate 'd5': cannot read image "
                                         r".*d5.png \(UnidentifiedImageError"):
        ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, progress=False)

    cache = dict(cache_dir=tmp_path / "c", reranker_key="k", progress=False)
    results = ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, on_error="skip", **cache)
    got = results["datasets"]["e_it2it"]
    assert got["skipped"] == len(hits)
    # numbers = both runs without the broken document
    clean = {q: {d: s for d, s in ds[0].run[q].items() if d != "d5"} for q in ds[0].queries}
    assert got["first_stage"] == evaluate(ds[0].qrels, clean, METRICS + ["ndcg@10"])
    # once the file is fixed, a resumed run re-scores exactly the queries that had skipped it
    (suite / "e_it2it" / "images" / "d5.png").write_bytes(good)
    fixed = FakeReranker()
    results = ev.evaluate_suite(ds, fixed, 5, METRICS, on_error="skip", **cache)
    assert fixed.calls == len(hits) and results["datasets"]["e_it2it"]["skipped"] == 0
    assert results == ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, progress=False)

    # an unreadable query image drops the query, counted once
    (suite / "e_it2it" / "images" / "d5.png").write_bytes(b"not a png")
    (suite / "e_it2it" / "images" / "q1.png").write_bytes(b"")
    results = ev.evaluate_suite(load_suite(suite)[4:], FakeReranker(), 5, METRICS, on_error="skip", progress=False)
    assert results["datasets"]["e_it2it"]["queries"] == 4
    assert any("query 'q1'" in m for m in results["datasets"]["e_it2it"]["skipped_items"])


def test_command_line_errors(suite, capsys):
    for argv in (["--suite", "mrb"], ["--metrics", "ndcg"], ["--top-k", "0"]):
        with pytest.raises(SystemExit):
            ev.parse_args(argv)
    assert "--suite mrb needs --data-dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown dataset\(s\) \['nope'\] .*available: a_t2t, b_t2t"):
        load_suite(suite, names=["a_t2t", "nope"])
    assert [d.name for d in load_suite(suite, names=["c_i2i", "a_t2t"])] == ["a_t2t", "c_i2i"]


def test_control_token_in_a_document(suite, tmp_path, monkeypatch, capsys):
    """<|image_pad|> in a document's text: named (file, line, id) before any scoring, or skipped and counted."""
    corpus = suite / "a_t2t" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines[2] = json.dumps({"id": "d2", "text": "see <|image_pad|> here"})
    corpus.write_text("\n".join(lines) + "\n")
    base = ["--suite", "mrb", "--data-dir", str(suite), "--model", str(tmp_path), "--datasets", "a_t2t",
            "--cache-dir", str(tmp_path / "c")]
    with pytest.raises(ValueError, match=r"dataset 'a_t2t': .*corpus.jsonl:3: id 'd2': text contains the control "
                                         r"token <\|image_pad\|>"):
        run_main(monkeypatch, capsys, base, FakeReranker())
    results, out = run_main(monkeypatch, capsys, base + ["--on-error", "skip"], FakeReranker())
    with_d2 = sum("d2" in docs for docs in read_trec(suite / "a_t2t" / "run.trec", 6).values())
    assert results["datasets"]["a_t2t"]["skipped"] == 1 + with_d2 and "<|image_pad|>" in out


def test_evaluate_suite_arguments(suite):
    ds = load_suite(suite)[:1]
    for top_k in (-1, 0, 2.5):  # -1 would slice off the last candidate
        with pytest.raises(ValueError, match=rf"top_k must be a positive integer, got {top_k}"):
            ev.evaluate_suite(ds, FakeReranker(), top_k, METRICS, progress=False)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        ev.evaluate_suite(ds, FakeReranker(), 5, METRICS, on_error="ignore", progress=False)
    with pytest.raises(ValueError, match="no datasets"):
        ev.evaluate_suite([], FakeReranker(), 5, METRICS, progress=False)


def test_batch_failure_no_single_item_reproduces_is_raised_as_is(suite):
    class BatchOfOneOnly(FakeReranker):
        def score(self, query, documents, instruction="", batch_size=None):
            if len(documents) > 1:
                raise ValueError("only one document at a time")
            return super().score(query, documents, instruction, batch_size)
    with pytest.raises(ValueError, match="^only one document at a time$"):  # nothing to blame an item for
        ev.evaluate_suite(load_suite(suite)[:1], BatchOfOneOnly(), 5, METRICS, on_error="skip", progress=False)


@pytest.mark.parametrize("flags, match", [
    (["--json", "DIR"], r"--json .*: is a folder; give a file name"),
    (["--json", "FILE/out.json"], r"--json .*/out.json: .*/file is not a folder"),
    (["--cache-dir", "FILE"], r"--cache-dir .*/file: is not a folder"),
    (["--device", "nope"], r"--device nope: not a torch device"),
    (["--model", "DIR/missing"], r"--model .*missing: no such folder"),
    (["--adapter", "FILE"], r"--adapter .*/file: not a folder"),
])
def test_command_line_paths_checked_before_any_work(tmp_path, capsys, flags, match):
    (tmp_path / "file").write_text("x")
    flags = [f.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "file")) for f in flags]
    with pytest.raises(SystemExit):
        ev.parse_args(["--data-dir", str(tmp_path)] + flags)
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("baseline, match", [
    ({"overall": {"reranked": 0.5}, "config": "x"}, r"'config' is not what eval.py --json writes"),
    ({"overall": {"reranked": 0.5}, "tasks": {"T->T": 3}}, r"'tasks' is not what eval.py --json writes"),
    ({"overall": {"reranked": "high"}}, r"not an eval.py --json result \(no 'overall' numbers\)"),
])
def test_baseline_of_the_wrong_shape(tmp_path, baseline, match):
    (tmp_path / "b.json").write_text(json.dumps(baseline))
    with pytest.raises(ValueError, match=rf"--baseline .*b.json: {match}"):
        read_baseline(str(tmp_path / "b.json"), 100)


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def synth_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for name in ("synth_t2t", "synth_it2it", "synth_t2vd"):
        synth.write_eval_dataset(str(root / "suite" / name), name, n_queries=3, n_candidates=6)
    synth.write_tiny_checkpoint(str(root / "checkpoint"))
    return root


def check_end_to_end(root, model, tmp_path, capsys):
    out_json = tmp_path / "out" / "eval.json"
    argv = ["--data-dir", str(root / "suite"), "--model", str(model), "--datasets", "synth_t2t", "synth_it2it",
            "--top-k", "4", "--json", str(out_json)]
    ev.main(argv)
    printed = capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert saved["config"]["model"] == str(Path(model).resolve()) and saved["config"]["top_k"] == 4
    assert set(saved["datasets"]) == {"synth_t2t", "synth_it2it"} and "overall" in printed
    assert list((tmp_path / "out" / ".eval_cache").glob("synth_t2t-*.jsonl"))  # default cache: next to --json
    # the reranked numbers equal metrics.evaluate on a run scored here by the same checkpoint
    reranker = Reranker.from_pretrained(str(model))
    for ds in load_suite(root / "suite"):
        if ds.name not in saved["datasets"]:
            continue
        as_input = lambda x: {k: v for k, v in (("text", x.text), ("image", x.image)) if v is not None}
        scores = {}
        for q in ds.queries:
            cands = ds.candidates(q)[:4]
            values = reranker.score(as_input(ds.queries[q]), [as_input(ds.corpus[d]) for d in cands],
                                    instruction=ds.instruction)
            scores.update({(q, d): v for d, v in zip(cands, values)})
        want = evaluate(ds.qrels, expected_reranked(ds, lambda q, d: scores[q, d], 4), METRICS)
        for m in METRICS:
            assert saved["datasets"][ds.name]["reranked"][m] == pytest.approx(want[m], rel=1e-12)
    # a second run reads everything from the cache and prints the same numbers
    ev.main(argv)
    assert json.loads(out_json.read_text())["datasets"] == saved["datasets"]


def test_end_to_end_synthetic_checkpoint(synth_suite, tmp_path, capsys):
    check_end_to_end(synth_suite, synth_suite / "checkpoint", tmp_path, capsys)


def test_cl_score_and_baseline_column(synth_suite, tmp_path, capsys):
    """--score cl ranks by the yes logit (cached apart from the p(yes) run); --baseline prints a run's numbers
    next to another's."""
    base = ["--data-dir", str(synth_suite / "suite"), "--model", str(synth_suite / "checkpoint"), "--datasets",
            "synth_t2t", "--top-k", "6", "--cache-dir", str(tmp_path / "cache")]
    ev.main(base + ["--json", str(tmp_path / "sft.json")])
    capsys.readouterr()
    ev.main(base + ["--score", "cl", "--json", str(tmp_path / "cl.json"), "--baseline", str(tmp_path / "sft.json")])
    printed = capsys.readouterr().out
    sft, cl = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("sft", "cl"))
    assert sft["config"]["score"] == "sft" and cl["config"]["score"] == "cl"
    assert len(list((tmp_path / "cache").glob("synth_t2t-*.jsonl"))) == 2  # the score type is part of the key
    ds = next(d for d in load_suite(synth_suite / "suite") if d.name == "synth_t2t")
    rr = Reranker.from_pretrained(str(synth_suite / "checkpoint"), score_type="cl")
    item = lambda x: {k: v for k, v in (("text", x.text), ("image", x.image)) if v is not None}
    logit = {}
    for q in ds.queries:
        cands = ds.candidates(q)[:6]
        z = rr.logits(item(ds.queries[q]), [item(ds.corpus[d]) for d in cands], instruction=ds.instruction)
        logit.update({(q, d): v for d, v in zip(cands, z[:, 0].tolist())})
    want = evaluate(ds.qrels, expected_reranked(ds, lambda q, d: logit[q, d], 6), METRICS)
    for m in METRICS:
        assert cl["datasets"]["synth_t2t"]["reranked"][m] == pytest.approx(want[m], rel=1e-12)
    header = next(line for line in printed.splitlines() if line.startswith("group "))
    assert "baseline" in header.split() and "vs baseline" in header
    overall = next(line for line in printed.splitlines() if line.startswith("overall"))
    b, r = sft["overall"]["reranked"], cl["overall"]["reranked"]
    at, vs = header.index("baseline "), header.index("vs baseline")  # columns are aligned: same offsets
    assert overall[at:].startswith(f"{b:.4f} ") and overall[vs:].startswith(f"{r - b:+.4f} ")
    with pytest.raises(SystemExit):
        ev.parse_args(base + ["--baseline", str(tmp_path / "missing.json")])
    assert "--baseline" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"overall": ')
    with pytest.raises(ValueError, match=r"--baseline .*bad.json: not valid JSON"):
        ev.main(base + ["--baseline", str(tmp_path / "bad.json")])
    (tmp_path / "other.json").write_text('{"numbers": []}')
    with pytest.raises(ValueError, match=r"--baseline .*other.json: not an eval.py --json result"):
        ev.main(base + ["--baseline", str(tmp_path / "other.json")])


def test_embedder_first_stage_equals_its_run_file(synth_suite, tmp_path, capsys):
    """--first-stage embedder retrieves each query's top k by cosine (the same as embedding.search on vectors
    computed here), writes that run, and gives exactly the numbers of evaluating that run as run.trec."""
    ckpt, names = str(synth_suite / "checkpoint"), ["synth_t2t", "synth_it2it"]
    common = ["--model", ckpt, "--datasets", *names, "--top-k", "5", "--cache-dir", str(tmp_path / "cache")]
    emb = ev.main(["--data-dir", str(synth_suite / "suite"), *common, "--first-stage", "embedder", "--embedder", ckpt,
                   "--json", str(tmp_path / "emb.json")])
    printed = capsys.readouterr().out
    assert "ceiling (recall@5)" in printed and "Verdict: reranking moved ndcg@10" in printed
    assert len(list((tmp_path / "cache").glob("synth_t2t-corpus-*.jsonl"))) == 1  # corpus embeddings cached
    embedder = Embedder.from_pretrained(ckpt)
    suite = tmp_path / "suite"
    for ds in load_suite(synth_suite / "suite", names=names):
        ids = list(ds.corpus)
        corpus = embedder.embed([ds.corpus[d].as_input() for d in ids])
        queries = embedder.embed([q.as_input() for q in ds.queries.values()], ds.instruction)
        written = read_run(tmp_path / "emb.runs" / f"{ds.name}.first-stage.trec")
        assert written == dict(zip(ds.queries, search(queries, corpus, ids, 5)))
        shutil.copytree(ds.root, suite / ds.name)
        shutil.copy(tmp_path / "emb.runs" / f"{ds.name}.first-stage.trec", suite / ds.name / "run.trec")
        assert read_run(tmp_path / "emb.runs" / f"{ds.name}.reranked.trec").keys() == written.keys()
    from_file = ev.main(["--data-dir", str(suite), *common, "--json", str(tmp_path / "file.json")])
    assert from_file["datasets"] == emb["datasets"] and from_file["overall"] == emb["overall"]
    again = ev.main(["--data-dir", str(synth_suite / "suite"), *common, "--first-stage", "embedder", "--embedder",
                     ckpt])  # corpus embeddings and scores from the caches
    assert again["datasets"] == emb["datasets"]
    for flags in (["--first-stage", "embedder"], ["--embedder", ckpt]):
        with pytest.raises(SystemExit):
            ev.parse_args(flags)
        assert "--first-stage embedder needs --embedder" in capsys.readouterr().err


def test_image_the_processor_refuses(synth_suite, tmp_path, capsys):
    """An image that decodes but that the reranker refuses (aspect ratio over 200) is blamed on its dataset, query
    and candidate; --on-error skip drops that candidate, or the query when it is the query's image."""
    suite = tmp_path / "suite"
    shutil.copytree(synth_suite / "suite" / "synth_it2it", suite / "synth_it2it")
    Image.new("RGB", (2814, 14), "red").save(suite / "synth_it2it" / "images" / "wide.png")
    ds = load_suite(suite)[0]
    q, d = next(iter(ds.queries)), ds.candidates(next(iter(ds.queries)))[1]
    hits = [x for x in ds.queries if d in ds.candidates(x)[:4]]

    def point_at_wide(file, item_id):
        lines = (suite / "synth_it2it" / file).read_text().splitlines()
        lines = [json.dumps({**json.loads(x), "image": "images/wide.png"}) if json.loads(x)["id"] == item_id else x
                 for x in lines]
        (suite / "synth_it2it" / file).write_text("\n".join(lines) + "\n")

    point_at_wide("corpus.jsonl", d)
    argv = ["--data-dir", str(suite), "--model", str(synth_suite / "checkpoint"), "--top-k", "4",
            "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(ValueError, match=rf"^dataset 'synth_it2it': query '{hits[0]}': candidate '{d}' "
                                         rf"\(image .*wide.png\): ValueError: .*aspect ratio"):
        ev.main(argv)
    results = ev.main(argv + ["--on-error", "skip"])["datasets"]["synth_it2it"]
    assert results["skipped"] == len(hits) and all(f"candidate '{d}'" in m for m in results["skipped_items"])
    clean = {x: {c: v for c, v in ds.run[x].items() if c != d} for x in ds.queries}
    assert results["first_stage"] == evaluate(ds.qrels, clean, METRICS + ["ndcg@10"])  # as if d were not there
    assert f"candidate '{d}' (image" in capsys.readouterr().out

    point_at_wide("queries.jsonl", q)  # now the query's own image: the query is dropped, counted once
    results = ev.main(argv + ["--on-error", "skip", "--cache-dir", str(tmp_path / "cache2")])
    skipped = results["datasets"]["synth_it2it"]["skipped_items"]
    assert sum(m.startswith(f"dataset 'synth_it2it': query '{q}' (image") for m in skipped) == 1
    assert results["datasets"]["synth_it2it"]["queries"] == len(ds.queries) - 1


def test_end_to_end_transformers_checkpoint(synth_suite, tmp_path, capsys):
    """A tiny random Qwen2_5_VLForConditionalGeneration saved by transformers, plus tokenizer and processor files."""
    model = tmp_path / "hf"
    save_tiny_hf(model, seed=1, tie=True)
    make_tiny_tokenizer_dir(model)
    write_preprocessor_config(model, min_pixels=4 * 28 * 28, max_pixels=64 * 28 * 28)
    check_end_to_end(synth_suite, model, tmp_path, capsys)


# ---------------------------------------------------------------------------------------------------- converter
BEIR_CORPUS = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "text": "dogs bark"},
               {"_id": 3, "image": "pages/p1.png"}, {"_id": "d4", "title": "Never retrieved", "text": "x"}]


def beir_source(tmp_path, corpus=BEIR_CORPUS, qrels="q1\td1\t1\nq2\t3\t2\nq2\td4\t1\n"):
    """A BEIR folder (with one image document) and a run over it, under tmp_path."""
    src = tmp_path / "beir"
    (src / "qrels").mkdir(parents=True)
    (src / "pages").mkdir()
    Image.new("RGB", (40, 30), "white").save(src / "pages" / "p1.png")
    (src / "corpus.jsonl").write_text("".join(json.dumps(c) + "\n" for c in corpus))
    queries = [{"_id": "q1", "text": "what purrs?"}, {"_id": "q2", "text": "show the page"},
               {"_id": "q9", "text": "a train-split query"}]
    (src / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    (tmp_path / "run.trec").write_text("q1 Q0 d2 1 0.9 gme\nq1 Q0 d1 2 0.8 gme\nq1 Q0 3 3 0.1 gme\n"
                                       "q2 Q0 3 1 0.7 gme\nq2 Q0 d1 2 0.7 gme\nq2 Q0 d2 3 0.2 gme\nq9 Q0 d4 1 1 gme\n")
    return src


def test_beir_to_suite(tmp_path):
    src = beir_source(tmp_path)
    out = tmp_path / "suite" / "toy"
    beir.main([str(src), str(tmp_path / "run.trec"), str(out), "--name", "toy", "--task", "T->VD",
               "--instruction", "Find the page.", "--top-k", "2"])
    ds = load_suite(tmp_path / "suite")[0]
    assert (ds.name, ds.task, ds.instruction, ds.main_metric) == ("toy", "T->VD", "Find the page.", "ndcg@10")
    assert set(ds.queries) == {"q1", "q2"}  # q9 has no test qrels
    assert ds.run == {"q1": {"d2": 0.9, "d1": 0.8}, "q2": {"d1": 0.7, "3": 0.7}}  # top 2; tie -> "d1" > "3"
    assert set(ds.corpus) == {"d1", "d2", "3"}  # only candidates
    assert ds.corpus["d1"].text == "Cats cats purr" and ds.corpus["d2"].text == "dogs bark"
    assert ds.corpus["3"].text is None and Path(ds.corpus["3"].image) == out / "images" / "pages" / "p1.png"
    assert Image.open(ds.corpus["3"].image).size == (40, 30)
    assert ds.qrels == {"q1": {"d1": 1}, "q2": {"3": 2, "d4": 1}}  # d4 stays relevant: the ceiling sees it

    (tmp_path / "run.trec").write_text("q1 Q0 d7 1 0.9 gme\n")
    with pytest.raises(ValueError, match=r"run.trec: query 'q1': candidate 'd7' is not in corpus.jsonl"):
        beir.convert(src, tmp_path / "run.trec", tmp_path / "bad", name="bad", task="T->T", instruction="i",
                     main_metric="ndcg@10")


@pytest.mark.parametrize("edit, match", [
    (dict(qrels="q1\td1\t1\nq2\t3\t0.5\n"), r"qrels/test.tsv:3: score '0.5' is not an integer relevance grade"),
    (dict(qrels="q1\td1\t1_0\n"), r"qrels/test.tsv:2: score '1_0' is not a number"),
    (dict(corpus=[{**BEIR_CORPUS[0], "title": 5}] + BEIR_CORPUS[1:]),
     r"corpus.jsonl:1: _id 'd1': 'title' must be a string, got int"),
    (dict(corpus=BEIR_CORPUS[:2] + [{"_id": 3, "image": 7}] + BEIR_CORPUS[3:]),
     r"corpus.jsonl:3: _id '3': 'image' must be a string, got int"),
    (dict(corpus=[{**BEIR_CORPUS[0], "_id": True}] + BEIR_CORPUS[1:]),
     r"corpus.jsonl:1: '_id' must be a string or an integer, got True"),
    ("latin1", r"corpus.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 32\)"),
    (dict(corpus=BEIR_CORPUS[:1] + [{"_id": "d2", "text": "dogs <|im_end|> bark"}] + BEIR_CORPUS[2:]),
     r"corpus.jsonl:2: _id 'd2': text contains the control token <\|im_end\|>"),
    (dict(corpus=BEIR_CORPUS[:1] + [{"_id": "d2", "title": " ", "text": "\t"}] + BEIR_CORPUS[2:]),
     r"corpus.jsonl:2: _id 'd2' has neither text nor image"),
    ("query_missing", r"queries.jsonl: query 'q2' of qrels/test.tsv is missing"),  # after the images are copied
])
def test_beir_to_suite_errors_leave_nothing_behind(tmp_path, edit, match):
    src = beir_source(tmp_path, **(edit if isinstance(edit, dict) else {}))
    if edit == "latin1":
        (src / "corpus.jsonl").write_bytes((src / "corpus.jsonl").read_bytes().replace(b"dogs", b"dogs caf\xe9"))
    if edit == "query_missing":
        (src / "queries.jsonl").write_text('{"_id": "q1", "text": "what purrs?"}\n')
    with pytest.raises(ValueError, match=match):
        beir.main([str(src), str(tmp_path / "run.trec"), str(tmp_path / "suite" / "toy"), "--name", "toy",
                   "--task", "T->VD", "--instruction", "Find the page.", "--top-k", "2"])
    assert list((tmp_path / "suite").iterdir()) == []  # no output folder, no hidden .toy.partial-* folder


@pytest.mark.parametrize("flags, match", [
    (["--main-metric", "bogus"], r"--main-metric: unknown metric 'bogus'"),
    (["--name", " "], r"--name must be a non-empty string"),
    (["--instruction", ""], r"--instruction must be a non-empty string"),
])
def test_beir_to_suite_flags_checked_before_reading(tmp_path, flags, match):
    argv = [str(tmp_path / "no_such_beir"), str(tmp_path / "no_such.trec"), str(tmp_path / "out"), "--name", "toy",
            "--task", "T->T", "--instruction", "i"]
    with pytest.raises(ValueError, match=match):
        beir.main(argv + flags)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_two_processes_give_the_numbers_of_one(synth_suite, tmp_path):
    """torchrun --nproc_per_node 2 eval.py: each process scores every other query into its own cache file, process 0
    merges them and reports; the JSON numbers and the TREC runs equal one process's exactly (embedder first stage
    included: process 0 embeds the corpora, process 1 reads its cache)."""
    common = ["--data-dir", str(synth_suite / "suite"), "--model", str(synth_suite / "checkpoint"), "--top-k", "4",
              "--first-stage", "embedder", "--embedder", str(synth_suite / "checkpoint"), "--dtype", "float32",
              "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out, sizes = {}, None
    for run, (n, cache) in enumerate([(1, "cache1"), (2, "cache2"), (2, "cache1")]):  # last: torchrun on a done cache
        launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc_per_node", "2"]
        done = subprocess.run([*launcher, str(ROOT / "eval.py"), *common, "--json", str(tmp_path / f"p{run}.json"),
                               "--cache-dir", str(tmp_path / cache)], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out[run] = json.loads((tmp_path / f"p{run}.json").read_text())
        assert not list((tmp_path / cache).glob("*.rank*")), "per-process cache files are merged away"
        if run == 0:
            sizes = {f.name: f.stat().st_size for f in (tmp_path / "cache1").glob("*.jsonl")}
    # the finished single-process cache was read, not scored again and appended to
    assert {f.name: f.stat().st_size for f in (tmp_path / "cache1").glob("*.jsonl")} == sizes
    assert out[1]["config"]["processes"] == 2
    for part in ("datasets", "tasks", "groups", "overall"):
        assert out[0][part] == out[1][part] == out[2][part], part
    for run in sorted((tmp_path / "p0.runs").glob("*.trec")):
        assert run.read_text() == (tmp_path / "p1.runs" / run.name).read_text(), run.name
