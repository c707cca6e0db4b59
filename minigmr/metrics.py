"""Ranking metrics (nDCG@k, Recall@k, MRR@k, MAP) and the TREC qrels / run files they read.

Every number here equals trec_eval's (and so pytrec_eval's, BEIR's and MTEB's), down to tie-breaking.
Each rule below mirrors a file of trec_eval 9.x:

  ranking    A query's documents are sorted by score descending, ties broken by doc id DESCENDING in
             byte order (form_res_rels.c comp_sim_docno). So among equal scores "d2" > "d10" > "d1".
             The rank column of a run file is ignored, as in trec_eval.
  relevance  Relevant = qrels rel >= 1. A document absent from qrels is non-relevant; a negative rel
             (trec_eval's "judged but unjudged") is non-relevant and never enters the ideal ranking.
  ndcg@k     m_ndcg_cut.c: DCG = sum over the top k of rel / log2(rank + 1) (only rel > 0 contributes),
             divided by the DCG of the ideal ranking: the query's positive qrels rels sorted descending,
             including relevant documents the run never retrieved, also cut at k.
  recall@k   m_recall.c: relevant documents in the top k / relevant documents in qrels.
  mrr@k      m_recip_rank.c on the run cut at k: 1 / rank of the first relevant document, 0 if none in
             the top k. (pytrec_eval's recip_rank has no cut: it is mrr@infinity.)
  map        m_map.c: the sum, over relevant retrieved documents, of the precision at their rank, divided
             by the number of relevant documents in qrels (so unretrieved ones count as 0). No cut.

Which queries are averaged: those present in the run that have at least one relevant document in qrels.
  - A query absent from the run is skipped, as pytrec_eval (and trec_eval without -c) does.
  - A query with no relevant document is skipped: all four metrics are 0/0 for it. trec_eval/pytrec_eval
    instead report 0.0 for such a query, so a mean taken over pytrec_eval's output (BEIR style) is lower
    than ours whenever such queries exist; on every query we do evaluate the values are identical.

Files. qrels: "qid 0 docid rel" per line; run: "qid Q0 docid rank score tag" per line, whitespace
separated, blank lines ignored; a doc id twice for one query is an error (trec_eval refuses it too). Numbers
are read as trec_eval's atoi/atof read them; spellings only Python accepts ("1_0", non-ASCII digits) are errors.
Files are UTF-8.
In Python both are dicts: qrels {qid: {docid: rel}}, run {qid: {docid: score}}.
"""

import math
import numbers
import os
import re
from collections.abc import Iterator, Sequence

Qrels = dict[str, dict[str, int]]  # {qid: {docid: rel}}
Run = dict[str, dict[str, float]]  # {qid: {docid: score}}
DEFAULT_METRICS = ("ndcg@10", "recall@10", "mrr@10", "map")
_METRIC_RE = re.compile(r"(ndcg|recall|mrr)@([1-9][0-9]*)|map")
# Numbers as C's atoi/atof (trec_eval) read them: no Python-only spellings such as "1_0" (Python: 10, trec_eval: 1)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)", re.IGNORECASE)
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" turns an undecodable byte into


def parse_metric(name: str) -> tuple[str, int | None]:
    """'ndcg@10' -> ('ndcg', 10), 'recall@100' -> ('recall', 100), 'mrr@10' -> ('mrr', 10), 'map' -> ('map', None)"""
    m = _METRIC_RE.fullmatch(name.strip().lower()) if isinstance(name, str) else None
    if m is None:
        raise ValueError(f"unknown metric {name!r}: expected ndcg@K, recall@K, mrr@K (K a positive integer) or map")
    return (m.group(1), int(m.group(2))) if m.group(1) else ("map", None)


def rank(scores: dict[str, float]) -> list[str]:
    """Doc ids of one query in trec_eval order: score descending, ties by doc id descending."""
    return sorted(scores, key=lambda d: (float(scores[d]), d), reverse=True)


def _query_metrics(rels: dict[str, int], scores: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """All requested metrics of one query; rels {docid: rel} has at least one rel >= 1."""
    ranked = [rels.get(d, 0) for d in rank(scores)]  # rel of the doc at each rank (0 = not in qrels)
    ideal = sorted((r for r in rels.values() if r > 0), reverse=True)
    out = {}
    for name in metrics:
        kind, k = parse_metric(name)
        if kind == "ndcg":
            dcg = sum(r / math.log2(i + 2) for i, r in enumerate(ranked[:k]) if r > 0)
            out[name] = dcg / sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:k]))
        elif kind == "recall":
            out[name] = sum(r > 0 for r in ranked[:k]) / len(ideal)
        elif kind == "mrr":
            out[name] = next((1.0 / (i + 1) for i, r in enumerate(ranked[:k]) if r > 0), 0.0)
        else:  # map
            hits, total = 0, 0.0
            for i, r in enumerate(ranked):
                if r > 0:
                    hits += 1
                    total += hits / (i + 1)  # precision at this relevant doc's rank
            out[name] = total / len(ideal)
    return out


def evaluate_per_query(qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} for every evaluated query (see the module docstring for which ones)."""
    for name in metrics:
        parse_metric(name)  # fail on a bad name even if no query gets evaluated
    out = {}
    for qid, scores in run.items():
        rels = qrels.get(qid, {})
        if not any(r > 0 for r in rels.values()):
            continue
        for docid, score in scores.items():
            if math.isnan(score):  # NaN has no place in a sort order: say which score is broken
                raise ValueError(f"run: query {qid!r} doc {docid!r} has a NaN score")
        out[qid] = _query_metrics(rels, scores, metrics)
    return out


def evaluate(qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """{metric: mean over the evaluated queries}, e.g. evaluate(qrels, run, ("ndcg@10", "map"))."""
    per_query = evaluate_per_query(qrels, run, metrics)
    if not per_query:
        raise ValueError("no query of the run has a relevant document (rel >= 1) in qrels: nothing to evaluate")
    return {name: sum(q[name] for q in per_query.values()) / len(per_query) for name in metrics}


def read_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """Yield (line number, line) of a UTF-8 text file (a leading BOM is dropped, as JSON parsers may do, RFC 8259
    §8.1); a byte that is not UTF-8 is a ValueError naming the file, the line and the column."""
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for n, line in enumerate(f, 1):
            bad = _NOT_UTF8.search(line)
            if bad:
                raise ValueError(f"{path}:{n}: not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at column "
                                 f"{bad.start() + 1})")
            yield n, line


def _rows(path: str | os.PathLike, fields: int, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, columns) of a whitespace-separated file with exactly `fields` columns."""
    for n, line in read_lines(path):
        cols = line.split()
        if not cols:
            continue
        if len(cols) != fields:
            raise ValueError(f"{path}:{n}: expected {fields} fields '{fmt}', got {len(cols)}: {line.strip()!r}")
        yield n, cols


def read_qrels(path: str | os.PathLike) -> Qrels:
    """TREC qrels file ("qid 0 docid rel", graded integer rel) -> {qid: {docid: rel}}."""
    qrels = {}
    for n, (qid, _, docid, rel) in _rows(path, 4, "qid 0 docid rel"):
        if not _INT_RE.fullmatch(rel):
            raise ValueError(f"{path}:{n}: relevance {rel!r} is not an integer")
        rel = int(rel)
        if docid in qrels.setdefault(qid, {}):
            raise ValueError(f"{path}:{n}: duplicate judgement for query {qid!r} doc {docid!r}")
        qrels[qid][docid] = rel
    return qrels


def read_run(path: str | os.PathLike) -> Run:
    """TREC run file ("qid Q0 docid rank score tag") -> {qid: {docid: score}}; rank and tag are not kept."""
    run = {}
    for n, (qid, _, docid, rnk, score, _) in _rows(path, 6, "qid Q0 docid rank score tag"):
        if not (_INT_RE.fullmatch(rnk) and _FLOAT_RE.fullmatch(score)):
            raise ValueError(f"{path}:{n}: rank {rnk!r} must be an integer and score {score!r} a number")
        score = float(score)
        if math.isnan(score):
            raise ValueError(f"{path}:{n}: query {qid!r} doc {docid!r} has a NaN score")
        if docid in run.setdefault(qid, {}):  # trec_eval refuses these too ("duplicate docs")
            raise ValueError(f"{path}:{n}: duplicate doc {docid!r} for query {qid!r}")
        run[qid][docid] = score
    return run


def _check_token(value: object, what: str) -> None:
    if not isinstance(value, str) or not value or len(value.split()) != 1 or value.strip() != value:
        raise ValueError(f"{what} {value!r} cannot be written to a TREC file: it must be non-empty, no whitespace")


def _write_lines(path: str | os.PathLike, lines: list[str]) -> None:
    """Write the lines, all checked beforehand, so that a bad id or value leaves no half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _value(value: object, what: str, integer: bool) -> float | int:
    """A score (a number, not NaN) or a relevance grade (an integer) as the TREC file holds it."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if not ok or integer and not float(value).is_integer():
        raise ValueError(f"{what} {value!r} must be {'an integer' if integer else 'a number (not NaN)'}")
    return int(value) if integer else float(value)


def write_run(path: str | os.PathLike, run: Run, tag: str) -> None:
    """Write {qid: {docid: score}} as a TREC run, each query's docs in trec_eval order with ranks 1, 2, ..."""
    _check_token(tag, "run tag")
    lines = []
    for qid, scores in run.items():
        _check_token(qid, "query id")
        for docid, score in scores.items():
            _check_token(docid, f"query {qid!r}: doc id")
            _value(score, f"query {qid!r}: doc {docid!r}: score", integer=False)
        lines += [f"{qid} Q0 {docid} {i + 1} {float(scores[docid])!r} {tag}\n"  # repr: exact round-trip
                  for i, docid in enumerate(rank(scores))]
    _write_lines(path, lines)


def write_qrels(path: str | os.PathLike, qrels: Qrels) -> None:
    """Write {qid: {docid: rel}} as a TREC qrels file (rel an integer grade: 0.5 is refused, not rounded)."""
    lines = []
    for qid, rels in qrels.items():
        _check_token(qid, "query id")
        for docid, rel in rels.items():
            _check_token(docid, f"query {qid!r}: doc id")
            lines.append(f"{qid} 0 {docid} {_value(rel, f'query {qid!r}: doc {docid!r}: relevance', True)}\n")
    _write_lines(path, lines)
