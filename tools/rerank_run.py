"""Rerank a first-stage TREC run: queries + corpus + run in, the reranked run (and per-query scores) out.

    python tools/rerank_run.py QUERIES.jsonl CORPUS.jsonl RUN.trec OUT.trec --model vec-ai/lychee-rerank-mm \\
        --instruction "Find the document that answers the question." --top-k 100

QUERIES / CORPUS: JSONL, one item per line, in minigmr's suite format ({"id", "text", "image"}) or BEIR's
({"_id", "title", "text", "image"}; a title is joined to the text by a space, as beir_to_suite.py does); an
image path is relative to its file. Only the queries of the run and the documents among their first --top-k
candidates (trec_eval order) are read into memory. OUT.trec holds, per query, those top-k candidates in the
reranker's order with its scores (tag `minigmr`); candidates past top-k are not written (say --top-k 1000 to
rerank more). Each query's candidates are scored in one call (its prefix encoded once); a progress bar counts
queries. A query or candidate absent from its file is an error naming the run line; OUT is written to a temporary
file and renamed, so an interrupted run leaves no partial file.
"""
import argparse
import os
import sys

from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from minigmr.data import parse_item, read_jsonl  # noqa: E402
from minigmr.metrics import rank, read_lines, read_run, write_run  # noqa: E402
from minigmr.scoring import Reranker  # noqa: E402

IGNORED = {"metadata"}  # BEIR's free-form field: nothing a reranker reads


def read_items(path: str, keep: set, is_corpus: bool) -> dict:
    """{id: item dict} for the ids in `keep`, streaming the file; errors name the file and line."""
    items, base = {}, os.path.dirname(os.path.abspath(path))
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        item_id = obj.get("id", obj.get("_id"))
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
            raise ValueError(f"{where}: missing 'id' (or BEIR '_id'): a non-empty string, got {item_id!r}")
        item_id = str(item_id)
        if item_id not in keep:
            continue
        if item_id in items:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        obj = {k: v for k, v in obj.items() if k not in ("id", "_id") and k not in IGNORED}
        title = obj.pop("title", None) if is_corpus else None
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{where}: id {item_id!r}: 'title' must be a string, got {type(title).__name__}")
        if title and title.strip():
            obj["text"] = f"{title} {obj['text']}" if isinstance(obj.get("text"), str) and obj["text"] else title
        item = parse_item(obj, item_id, f"{where}: id {item_id!r}", base)
        items[item_id] = item.as_input()
    return items


def rerank(reranker: Reranker, queries: str, corpus: str, run_file: str, out: str, instruction=None,
           top_k: int = 100, batch_size=None, show_progress_bar=None) -> dict:
    """Write OUT (see the module docstring) and return the reranked run {qid: {docid: score}}."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    first = {q: rank(docs)[:top_k] for q, docs in read_run(run_file).items()}
    qs = read_items(queries, set(first), is_corpus=False)
    docs = read_items(corpus, {d for ds in first.values() for d in ds}, is_corpus=True)
    line = lambda q, d=None: next(n for n, text in read_lines(run_file)
                                  if text.split()[:1] == [q] and (d is None or text.split()[2] == d))
    for q, ds in first.items():
        if q not in qs:
            raise ValueError(f"{run_file}:{line(q)}: query {q!r} is not in {queries}")
        for d in ds:
            if d not in docs:
                raise ValueError(f"{run_file}:{line(q, d)}: query {q!r}: candidate {d!r} is not in {corpus}")
    reranked = {}
    for q, ds in tqdm(first.items(), unit="query", desc="reranking",
                      disable=None if show_progress_bar is None else not show_progress_bar):
        reranked[q] = dict(zip(ds, reranker.score(qs[q], [docs[d] for d in ds], instruction, batch_size)))
    tmp = f"{out}.partial"
    write_run(tmp, reranked, "minigmr")
    os.replace(tmp, out)
    return reranked


def main(argv=None):
    p = argparse.ArgumentParser(description="rerank a first-stage TREC run with a minigmr reranker")
    p.add_argument("queries", help="queries JSONL (suite format {id, text, image} or BEIR {_id, text})")
    p.add_argument("corpus", help="documents JSONL (suite format or BEIR {_id, title, text, image})")
    p.add_argument("run", help="first-stage TREC run (qid Q0 docid rank score tag)")
    p.add_argument("out", help="reranked TREC run to write")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--adapter", help="LoRA adapter folder or hub id (minigmr or peft format)")
    p.add_argument("--instruction", help="task instruction given with every pair (default: minigmr's default)")
    p.add_argument("--top-k", type=int, default=100, help="candidates reranked per query (default 100, as MRB)")
    p.add_argument("--batch-size", type=int, default=16, help="documents per forward batch (default 16)")
    p.add_argument("--score", choices=("sft", "cl"), help="sft = p(yes), cl = the yes logit; default: the "
                   "checkpoint's minigmr_reranker.json, else sft")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    a = p.parse_args(argv)
    if a.top_k < 1 or a.batch_size < 1:
        p.error(f"--top-k and --batch-size must be >= 1, got {a.top_k} and {a.batch_size}")
    rr = Reranker.from_pretrained(a.model, adapter=a.adapter, device=a.device, score_type=a.score,
                                  batch_size=a.batch_size)
    reranked = rerank(rr, a.queries, a.corpus, a.run, a.out, a.instruction, a.top_k)
    print(f"{a.out}: {len(reranked)} queries, {sum(map(len, reranked.values()))} candidates reranked")


if __name__ == "__main__":
    main()
