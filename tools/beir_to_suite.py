"""Convert a BEIR-style dataset folder plus a first-stage TREC run into one minigmr suite dataset (minigmr/data.py).

    python tools/beir_to_suite.py BEIR_DIR RUN.trec OUT_DIR --name vidore_docvqa --task "T->VD" \\
        --instruction "Find a screenshot that relevant to the user's question." --main-metric ndcg@10

Input (the BEIR layout, beir-cellar/beir wiki "Load your custom dataset"):
  BEIR_DIR/corpus.jsonl      {"_id": str, "title": str (optional), "text": str (optional), "image": str (optional)}
  BEIR_DIR/queries.jsonl     {"_id": str, "text": str (optional), "image": str (optional)}
  BEIR_DIR/qrels/<split>.tsv header line, then "query-id<TAB>corpus-id<TAB>score"
  RUN.trec                   "qid Q0 docid rank score tag", e.g. GME-2B's retrieval over the whole corpus
"image" is not BEIR (which is text only): it is the path of an image file relative to BEIR_DIR, which is how
multimodal exports are written here (docs/mrb.md shows how to get there from UMRB / M-BEIR / ViDoRe).
Documents are "title text" joined by a space when both exist, as BEIR's dense retrievers read them.

Output: OUT_DIR in the suite format. Kept: the queries of the qrels split, each with its first `--top-k` run
candidates (trec_eval order), and only the documents some kept query has as a candidate, since a reranker
never sees the others (qrels still name every relevant document, so recall keeps the first stage's ceiling).
Images are copied to OUT_DIR/images/ under their relative path.
"""
import argparse
import csv
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from minigmr.data import TASK_TYPES, Item, inside, load_dataset, read_jsonl, write_dataset  # noqa: E402
from minigmr.metrics import parse_metric, rank, read_lines, read_run  # noqa: E402
from minigmr.tokenizer import special_token  # noqa: E402


def read_beir_qrels(path):
    """{qid: {docid: rel}} from a BEIR qrels TSV (a header line, then query-id, corpus-id, score)."""
    qrels = {}
    if not os.path.isfile(path):
        splits = sorted(f[:-4] for f in os.listdir(os.path.dirname(path)) if f.endswith(".tsv")) \
            if os.path.isdir(os.path.dirname(path)) else []
        raise ValueError(f"{path}: not found; the qrels splits there: {splits or 'none'} (--split)")
    rows = csv.reader((line for _, line in read_lines(path)), delimiter="\t")  # as BEIR's GenericDataLoader
    header = next(rows, None)
    if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
        raise ValueError(f"{path}:1: expected the header 'query-id<TAB>corpus-id<TAB>score', got {header}")
    for n, row in enumerate(rows, 2):
        if not row:
            continue
        if len(row) != 3:
            raise ValueError(f"{path}:{n}: expected 3 tab-separated fields, got {row}")
        qid, docid, score = (x.strip() for x in row)
        try:
            value = float(score.replace("_", "x"))  # "1_0" is Python-only syntax, not a number to trec_eval
        except ValueError:
            raise ValueError(f"{path}:{n}: score {score!r} is not a number") from None
        if not value.is_integer():  # trec_eval's qrels hold integers: 0.5 would silently become 0
            raise ValueError(f"{path}:{n}: score {score!r} is not an integer relevance grade; map graded "
                             "or fractional judgements to integers (>= 1 relevant) before converting")
        if docid in qrels.setdefault(qid, {}):
            raise ValueError(f"{path}:{n}: duplicate judgement for query {qid!r} doc {docid!r}")
        qrels[qid][docid] = int(value)
    return qrels


def read_beir_items(path, keep, out_dir, is_corpus):
    """{id: Item} for the ids in `keep`, streaming the file (a corpus may hold millions of documents)."""
    items, base = {}, os.path.dirname(os.path.abspath(path))
    for n, obj in read_jsonl(path):
        if obj.get("_id") in (None, ""):
            raise ValueError(f"{path}:{n}: missing '_id'")
        if isinstance(obj["_id"], bool) or not isinstance(obj["_id"], (str, int)):
            raise ValueError(f"{path}:{n}: '_id' must be a string or an integer, got {obj['_id']!r}")
        item_id = str(obj["_id"])  # ViDoRe's corpus-id is an integer
        if item_id not in keep:
            continue
        if len(item_id.split()) != 1 or item_id.strip() != item_id:
            raise ValueError(f"{path}:{n}: _id {item_id!r} has whitespace, which a TREC file cannot hold")
        if item_id in items:
            raise ValueError(f"{path}:{n}: duplicate _id {item_id!r}")
        for key in ("title", "text", "image"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise ValueError(f"{path}:{n}: _id {item_id!r}: {key!r} must be a string, got "
                                 f"{type(obj[key]).__name__}")
        parts = [obj.get("title"), obj.get("text")] if is_corpus else [obj.get("text")]
        text = " ".join(p for p in parts if p and p.strip()) or None  # a blank part is no part
        if special_token(text):
            raise ValueError(f"{path}:{n}: _id {item_id!r}: text contains the control token {special_token(text)}, "
                             "which the reranker would read as prompt structure")
        image = obj.get("image")
        if image:
            src = os.path.normpath(os.path.join(base, image))
            rel = os.path.relpath(src, base)
            if not inside(src, base):
                raise ValueError(f"{path}:{n}: _id {item_id!r}: image {image!r} is outside {base}")
            if not os.path.isfile(src):
                raise ValueError(f"{path}:{n}: _id {item_id!r}: image not found: {src}")
            image = os.path.join("images", rel)
            os.makedirs(os.path.dirname(os.path.join(out_dir, image)), exist_ok=True)
            shutil.copyfile(src, os.path.join(out_dir, image))
        if text is None and not image:
            raise ValueError(f"{path}:{n}: _id {item_id!r} has neither text nor image")
        items[item_id] = Item(item_id, text, image or None)
    return items


def convert(beir_dir, run_file, out_dir, *, name, task, instruction, main_metric, split="test", top_k=100,
            source=None):
    """Write out_dir (suite format) and return the loaded, validated Dataset. The dataset is built in a hidden
    sibling folder and renamed into place at the end, so a failed conversion leaves nothing behind."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    for flag, value in (("--name", name), ("--instruction", instruction)):  # meta.json's rules, before any work
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{flag} must be a non-empty string, got {value!r}")
    if task not in TASK_TYPES:
        raise ValueError(f"--task {task!r} is not one of {', '.join(TASK_TYPES)}")
    try:
        parse_metric(main_metric)
    except ValueError as e:
        raise ValueError(f"--main-metric: {e}") from None
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} already exists and is not an empty folder; remove it or choose another")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        _convert(beir_dir, run_file, tmp, name=name, task=task, instruction=instruction, main_metric=main_metric,
                 split=split, top_k=top_k, source=source)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_dataset(out_dir)


def _convert(beir_dir, run_file, out_dir, *, name, task, instruction, main_metric, split, top_k, source):
    qrels = read_beir_qrels(os.path.join(beir_dir, "qrels", f"{split}.tsv"))
    full_run = read_run(run_file)
    run = {q: {d: full_run.get(q, {})[d] for d in rank(full_run.get(q, {}))[:top_k]} for q in qrels}
    needed_docs = {d for docs in run.values() for d in docs}
    corpus = read_beir_items(os.path.join(beir_dir, "corpus.jsonl"), needed_docs, out_dir, is_corpus=True)
    missing = sorted(needed_docs - set(corpus))
    if missing:
        q = next(q for q, docs in run.items() if missing[0] in docs)
        raise ValueError(f"{run_file}: query {q!r}: candidate {missing[0]!r} is not in corpus.jsonl "
                         f"({len(missing)} such candidates)")
    queries = read_beir_items(os.path.join(beir_dir, "queries.jsonl"), set(qrels), out_dir, is_corpus=False)
    if len(queries) < len(qrels):
        raise ValueError(f"{beir_dir}/queries.jsonl: query {sorted(set(qrels) - set(queries))[0]!r} of "
                         f"qrels/{split}.tsv is missing")
    ignored = sum(q not in qrels for q in full_run)
    if ignored:
        print(f"{run_file}: {ignored} run queries are not in qrels/{split}.tsv: ignored", file=sys.stderr)
    write_dataset(out_dir, name=name, task=task, instruction=instruction, main_metric=main_metric,
                  queries=queries, corpus=corpus, qrels=qrels, run=run, source=source)


def main(argv=None):
    p = argparse.ArgumentParser(description="BEIR folder + first-stage TREC run -> one minigmr suite dataset.")
    p.add_argument("beir_dir", help="folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    p.add_argument("run", help="first-stage TREC run file (qid Q0 docid rank score tag)")
    p.add_argument("out_dir", help="output dataset folder (usually SUITE/<name>)")
    p.add_argument("--name", required=True, help="dataset name, as eval.py --datasets selects it")
    p.add_argument("--task", required=True, choices=TASK_TYPES, help="query->document modality, e.g. T->VD")
    p.add_argument("--instruction", required=True, help="task instruction given to the reranker with every pair")
    p.add_argument("--main-metric", default="ndcg@10", help="the dataset's reported number (default: ndcg@10)")
    p.add_argument("--split", default="test", help="qrels split to keep (default: test)")
    p.add_argument("--top-k", type=int, default=100, help="candidates kept per query (default 100, as MRB)")
    p.add_argument("--source", help="free-text provenance stored in meta.json (e.g. 'izhx/UMRB-OKVQA + GME-2B')")
    a = p.parse_args(argv)
    if a.top_k < 1:
        p.error(f"--top-k must be >= 1, got {a.top_k}")
    ds = convert(a.beir_dir, a.run, a.out_dir, name=a.name, task=a.task, instruction=a.instruction,
                 main_metric=a.main_metric, split=a.split, top_k=a.top_k, source=a.source)
    print(f"{a.out_dir}: {len(ds.queries)} queries, {len(ds.corpus)} documents, "
          f"{sum(map(len, ds.run.values()))} candidates")


if __name__ == "__main__":
    main()
