"""Tests for minigmr/metrics.py: parity with pytrec_eval (trec_eval's C code) on random runs full of ties,
hand-computed small cases, and the file readers/writers with their error messages."""

import functools
import math
import random

import pytest
import pytrec_eval

from minigmr import metrics as M

KS = (1, 5, 10, 100)
NAMES = [f"{m}@{k}" for m in ("ndcg", "recall", "mrr") for k in KS] + ["map"]
TOL = 1e-9


def _random_world(seed, n_queries=40):
    """Random qrels/run with: graded rels 0..3 (a few -1), scores from a 3-value set (many ties among
    relevant and non-relevant docs), doc ids of different lengths (so string order != numeric order),
    queries without relevant docs, relevant docs the run misses, run docs not in qrels, run-only queries."""
    rng = random.Random(seed)
    qrels, run = {}, {}
    for q in range(n_queries):
        qid = f"q{q}"
        pool = [f"d{i}" for i in rng.sample(range(300), 160)]
        n_judged = rng.choice([0, 1, 3, 20, 60])
        judged = pool[:n_judged] if rng.random() < 0.7 else rng.sample(range(1000, 1100), n_judged)
        rels = {str(d): rng.choice([-1, 0, 0, 0, 1, 2, 3]) if rng.random() < 0.95 else 0 for d in judged}
        if rng.random() < 0.15:
            rels = {d: 0 for d in rels}  # judged but nothing relevant
        if rels or rng.random() < 0.5:
            qrels[qid] = rels
        n_ret = rng.choice([0, 1, 4, 12, 50, 150])
        run[qid] = {d: rng.choice([0.0, 0.5, 1.0]) for d in rng.sample(pool, n_ret)}
    run["only_in_run"] = {"d1": 1.0}
    return qrels, run


def _pytrec(qrels, run):
    measures = {"map", "recip_rank", "ndcg_cut." + ",".join(map(str, KS)), "recall." + ",".join(map(str, KS))}
    return pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)


def _expected_from_pytrec(res, k_names=NAMES):
    """Our metric names from pytrec_eval's measures. mrr@k comes from the uncut recip_rank rr = 1/rank:
    the first relevant doc is inside the top k exactly when round(1/rr) <= k."""
    out = {}
    for name in k_names:
        kind, k = M.parse_metric(name)
        if kind == "ndcg":
            out[name] = res[f"ndcg_cut_{k}"]
        elif kind == "recall":
            out[name] = res[f"recall_{k}"]
        elif kind == "mrr":
            rr = res["recip_rank"]
            out[name] = rr if rr > 0 and round(1 / rr) <= k else 0.0
        else:
            out[name] = res["map"]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_pytrec_eval_on_random_runs_with_ties(seed):
    qrels, run = _random_world(seed)
    ref = _pytrec(qrels, run)
    # pytrec_eval scores every run query that has qrels; we skip those without a relevant doc.
    has_rel = {q for q in ref if any(r > 0 for r in qrels[q].values())}
    assert 0 < len(has_rel) < len(ref)  # the world really contains both kinds of queries
    ours = M.evaluate_per_query(qrels, run, NAMES)
    assert set(ours) == has_rel
    for qid in has_rel:
        expected = _expected_from_pytrec(ref[qid])
        for name in NAMES:
            assert math.isclose(ours[qid][name], expected[name], rel_tol=0, abs_tol=TOL), (seed, qid, name)
    means = M.evaluate(qrels, run, NAMES)
    for name in NAMES:
        expected = sum(_expected_from_pytrec(ref[q])[name] for q in has_rel) / len(has_rel)
        assert math.isclose(means[name], expected, rel_tol=0, abs_tol=TOL), name


def test_mrr_matches_pytrec_eval_on_truncated_run():
    """The brief's oracle: recip_rank of pytrec_eval on the run cut to its top k. The cut uses trec_eval's
    comparator (form_res_rels.c comp_sim_docno) transcribed here, not minigmr's rank()."""
    def comp_sim_docno(a, b):  # a, b = (docid, score)
        if a[1] != b[1]:
            return -1 if a[1] > b[1] else 1
        return (b[0] > a[0]) - (b[0] < a[0])  # strcmp(p2->docno, p1->docno)

    for seed in range(3):
        qrels, run = _random_world(100 + seed)
        for k in KS:
            key = functools.cmp_to_key(comp_sim_docno)
            cut = {q: dict(sorted(docs.items(), key=key)[:k]) for q, docs in run.items()}
            ref = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
            ours = M.evaluate_per_query(qrels, run, [f"mrr@{k}"])
            for qid, vals in ours.items():
                assert math.isclose(vals[f"mrr@{k}"], ref[qid]["recip_rank"], rel_tol=0, abs_tol=TOL)


def test_hand_computed_small_case():
    qrels = {"q": {"a": 3, "b": 1, "c": 0, "n": -1}}
    run = {"q": {"a": 0.1, "b": 0.9, "c": 0.5, "x": 0.7, "n": 0.95}}  # order: n, b, x, c, a
    got = M.evaluate(qrels, run, ["ndcg@3", "ndcg@5", "recall@2", "recall@5", "mrr@1", "mrr@10", "map"])
    idcg = 3 + 1 / math.log2(3)
    assert math.isclose(got["ndcg@3"], (1 / math.log2(3)) / idcg, abs_tol=1e-12)  # only b (rank 2) in top 3
    assert math.isclose(got["ndcg@5"], (1 / math.log2(3) + 3 / math.log2(6)) / idcg, abs_tol=1e-12)
    assert got["recall@2"] == 0.5 and got["recall@5"] == 1.0
    assert got["mrr@1"] == 0.0 and got["mrr@10"] == 0.5  # the negative-rel doc at rank 1 is non-relevant
    assert math.isclose(got["map"], (1 / 2 + 2 / 5) / 2, abs_tol=1e-12)


def test_ties_broken_by_docid_descending_as_strings():
    # equal scores: "d2" > "d10" > "d1" as strings, so the relevant d1 is ranked third, not first
    assert M.rank({"d1": 1.0, "d2": 1.0, "d10": 1.0, "e": 0.5}) == ["d2", "d10", "d1", "e"]
    got = M.evaluate({"q": {"d1": 1}}, {"q": {"d1": 1.0, "d2": 1.0, "d10": 1.0}}, ["mrr@10", "mrr@2"])
    assert math.isclose(got["mrr@10"], 1 / 3) and got["mrr@2"] == 0.0


def test_query_skipping_and_means():
    qrels = {"q1": {"a": 1}, "q2": {"a": 0}, "q3": {"a": 2}}  # q2 has no relevant doc; q3 is not in the run
    run = {"q1": {"a": 1.0, "b": 2.0}, "q2": {"a": 1.0}, "q4": {"a": 1.0}}  # q4 is not in qrels
    assert set(M.evaluate_per_query(qrels, run)) == {"q1"}
    assert M.evaluate(qrels, run, ["mrr@10"]) == {"mrr@10": 0.5}
    run["q3"] = {}  # present but retrieved nothing: evaluated, scores 0
    assert M.evaluate(qrels, run, ["mrr@10", "map"]) == {"mrr@10": 0.25, "map": 0.25}


@pytest.mark.parametrize("name,expected", [("ndcg@5", ("ndcg", 5)), ("recall@100", ("recall", 100)),
                                           ("mrr@10", ("mrr", 10)), ("map", ("map", None)),
                                           (" NDCG@10 ", ("ndcg", 10))])
def test_parse_metric(name, expected):
    assert M.parse_metric(name) == expected


@pytest.mark.parametrize("name", ["ndcg", "ndcg@0", "ndcg@-1", "p@5", "map@10", "recall@ten", "mrr@", "", None])
def test_parse_metric_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="unknown metric"):
        M.parse_metric(name)


def test_evaluate_errors():
    with pytest.raises(ValueError, match="unknown metric 'precision@5'"):
        M.evaluate({"q": {"a": 1}}, {"q": {"a": 1.0}}, ["ndcg@10", "precision@5"])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        M.evaluate({"q": {"a": 0}}, {"q": {"a": 1.0}})
    with pytest.raises(ValueError, match="query 'q' doc 'b' has a NaN score"):
        M.evaluate({"q": {"a": 1}}, {"q": {"a": 1.0, "b": float("nan")}})


def test_run_and_qrels_files_round_trip(tmp_path):
    qrels, run = _random_world(7, n_queries=5)
    run["q0"]["d_exact"] = 0.1 + 0.2  # not representable in short decimal: must survive exactly
    M.write_run(tmp_path / "run.trec", run, "mytag")
    M.write_qrels(tmp_path / "qrels.tsv", qrels)
    assert M.read_run(tmp_path / "run.trec") == run
    assert M.read_qrels(tmp_path / "qrels.tsv") == qrels
    lines = (tmp_path / "run.trec").read_text().splitlines()
    q0 = [line.split() for line in lines if line.startswith("q0 ")]
    assert [c[3] for c in q0] == [str(i + 1) for i in range(len(q0))]  # ranks 1..n
    assert [c[2] for c in q0] == M.rank(run["q0"]) and all(c[1] == "Q0" and c[5] == "mytag" for c in q0)


def test_read_run_ignores_rank_column(tmp_path):
    path = tmp_path / "run.trec"
    path.write_text("q Q0 a 1 0.1 t\n\nq Q0 b 2 0.9 t\n")  # rank says a first; score says b first
    run = M.read_run(path)
    assert run == {"q": {"a": 0.1, "b": 0.9}} and M.rank(run["q"]) == ["b", "a"]


@pytest.mark.parametrize("text,match", [
    ("q Q0 a 1 0.5 t\nq Q0 b 2 0.4\n", r"run.trec:2: expected 6 fields"),
    ("q Q0 a 1 high t\n", r"run.trec:1: rank '1' must be an integer and score 'high' a number"),
    ("q Q0 a 0.5 1 t\n", r"run.trec:1: rank '0.5' must be an integer"),
    ("q Q0 a 1 nan t\n", r"run.trec:1: query 'q' doc 'a' has a NaN score"),
    ("q Q0 a 1 0.5 t\nq Q0 b 2 0.4 t\nq Q0 a 3 0.3 t\n", r"run.trec:3: duplicate doc 'a' for query 'q'"),
])
def test_read_run_errors(tmp_path, text, match):
    (tmp_path / "run.trec").write_text(text)
    with pytest.raises(ValueError, match=match):
        M.read_run(tmp_path / "run.trec")


@pytest.mark.parametrize("text,match", [
    ("q 0 a 1\nq 0 b\n", r"qrels.tsv:2: expected 4 fields 'qid 0 docid rel', got 3"),
    ("q 0 a 1\n\nq 0 b 0.5\n", r"qrels.tsv:3: relevance '0.5' is not an integer"),
    ("q 0 a 1\nq 0 a 2\n", r"qrels.tsv:2: duplicate judgement for query 'q' doc 'a'"),
])
def test_read_qrels_errors(tmp_path, text, match):
    (tmp_path / "qrels.tsv").write_text(text)
    with pytest.raises(ValueError, match=match):
        M.read_qrels(tmp_path / "qrels.tsv")


def test_write_run_rejects_ids_with_whitespace(tmp_path):
    with pytest.raises(ValueError, match="query 'q': doc id 'a b'"):
        M.write_run(tmp_path / "run.trec", {"q": {"a b": 1.0}}, "t")
    with pytest.raises(ValueError, match="run tag 'my tag'"):
        M.write_run(tmp_path / "run.trec", {"q": {"a": 1.0}}, "my tag")


@pytest.mark.parametrize("name, text, match", [
    ("qrels.tsv", "q 0 a 1_0\n", r"qrels.tsv:1: relevance '1_0' is not an integer"),  # Python: 10, trec_eval: 1
    ("qrels.tsv", "q 0 a \u0661\n", r"qrels.tsv:1: relevance '\u0661' is not an integer"),  # an Arabic-Indic 1
    ("run.trec", "q Q0 a 1 1_000 t\n", r"run.trec:1: rank '1' must be an integer and score '1_000' a number"),
    ("run.trec", "q Q0 a 1_0 1 t\n", r"run.trec:1: rank '1_0' must be an integer"),
])
def test_numbers_only_as_trec_eval_reads_them(tmp_path, name, text, match):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        (M.read_qrels if name == "qrels.tsv" else M.read_run)(tmp_path / name)


def test_numbers_trec_eval_accepts(tmp_path):
    (tmp_path / "qrels.tsv").write_text("q 0 a +1\nq 0 b -1\n")
    (tmp_path / "run.trec").write_text("q Q0 a +1 1e3 t\nq Q0 b 2 -inf t\nq Q0 c 3 .5 t\n")
    assert M.read_qrels(tmp_path / "qrels.tsv") == {"q": {"a": 1, "b": -1}}
    assert M.read_run(tmp_path / "run.trec") == {"q": {"a": 1000.0, "b": float("-inf"), "c": 0.5}}


@pytest.mark.parametrize("name", ["qrels.tsv", "run.trec"])
def test_non_utf8_byte_names_file_line_and_column(tmp_path, name):
    line = b"q 0 d\xff 1\n" if name == "qrels.tsv" else b"q Q0 \xff 1 0.5 t\n"
    (tmp_path / name).write_bytes(line.replace(b"\xff", b"d") + line)
    with pytest.raises(ValueError, match=rf"{name}:2: not valid UTF-8 \(byte 0xff at column 6\)"):
        (M.read_qrels if name == "qrels.tsv" else M.read_run)(tmp_path / name)


@pytest.mark.parametrize("writer, table, match", [
    (M.write_qrels, {"q": {"a": 1, "b": 0.5}}, r"query 'q': doc 'b': relevance 0.5 must be an integer"),
    (M.write_qrels, {"q": {"a": 1, "b": "1"}}, r"query 'q': doc 'b': relevance '1' must be an integer"),
    (M.write_run, {"q": {"a": 1.0}, "r": {"b": float("nan")}}, r"query 'r': doc 'b': score nan must be a number"),
    (M.write_run, {"q": {"a": 1.0, "b": None}}, r"query 'q': doc 'b': score None must be a number"),
])
def test_writers_refuse_values_they_cannot_write_and_leave_no_file(tmp_path, writer, table, match):
    with pytest.raises(ValueError, match=match):
        writer(tmp_path / "out", table, *(["t"] if writer is M.write_run else []))
    assert not (tmp_path / "out").exists()
