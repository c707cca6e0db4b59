"""Evaluate a minigmr reranker the way MRB does (arXiv 2510.14824; docs/gmr.md §4): rerank every query's
first-stage candidates and report, per dataset, the first-stage numbers, the reranked numbers and the first-stage
recall ceiling, then macro averages per task type, per group (single-, cross-, fused-modal) and overall.

    python eval.py --suite synth                       # the synthetic world (generated on first use), tiny model
    python eval.py --suite mrb --data-dir mrb/ --model ckpt/ --adapter runs/lora/ --json out/mrb.json
    python eval.py --first-stage embedder --embedder data/synth/embedder --model runs/sft/merged   # retrieve first

A suite is a folder of datasets in minigmr's format (minigmr/data.py); docs/mrb.md explains how to build MRB's.

What is compared, per dataset:
  first stage  run.trec as it is (MRB: GME-2B's top 100), or with `--first-stage embedder --embedder PATH` the
               exact top `--top-k` of an embedder (minigmr/embedding.py) by cosine similarity, each corpus
               embedded once (cached), ties broken as trec_eval breaks them.
  reranked     the first `--top-k` candidates (the rerank depth) ordered by the reranker's score (`--score`);
               candidates below the depth keep their first-stage order under them: both runs hold the same documents.
  ceiling      first-stage recall@top-k: the share of the relevant documents among the candidates the reranker sees.
  Every number is minigmr.metrics (trec_eval conventions, ties by doc id); each dataset's `main_metric` is averaged
  as MRB does, a macro mean over datasets (per task type, per group, overall; minigmr/report.py).

On several processes (`torchrun --nproc_per_node N eval.py ...`, one node or many) each process scores every N-th
query of each dataset into its own cache file; process 0 merges them and reports: the numbers of one process.

Scores are cached per dataset in an append-only JSONL file (a line per query as soon as it is scored), keyed by
the model and adapter (path and file stats: retraining into the same folder gets a new key), the dtype, the rerank
depth, the first stage and a hash of the dataset files; an interrupted run resumes (minigmr/eval_cache.py). Next to --json (or in --runs-dir): every dataset's first-stage and reranked runs
as TREC files; the JSON holds each query's main metric, first stage and reranked, for paired intervals.
"""
import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from minigmr.data import TASK_TYPES, load_suite, read_json, write_json
from minigmr.embedding import Embedder, search
from minigmr.eval_cache import (cache_file, corpus_embeddings, embedding_cache_file, fingerprint, merge_rank_caches,
                                read_cache)
from minigmr.files import unwritable
from minigmr.hardware import set_threads
from minigmr.hub import resolve
from minigmr.metrics import DEFAULT_METRICS, evaluate, evaluate_per_query, parse_metric, write_run
from minigmr.report import aggregate, read_baseline, report
from minigmr.scoring import Reranker, default_device_dtype
from minigmr.synth import ensure_world

DEFAULT_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "synth")
MRB_KNOWN_COUNTS = {"T->T": 14, "T->VD": 5, "IT->IT": 3}  # the per-task counts that were found (docs/gmr.md §4)
MRB_SIZE = 40


# ---------------------------------------------------------------------------------------------------- reranking
# What a bad query or document makes the reranker raise (an image PIL cannot decode or the processor refuses, a
# text the prompt cannot hold); anything else (an interruption, out of memory) is not blamed on an item.
ITEM_ERRORS = (ValueError, OSError, Image.DecompressionBombError)
PROBE = {"text": "probe"}  # a plain text document: when the query fails with it, the query is at fault


def unreadable(item):
    """Why PIL cannot decode the item's image, or None (also None for a text-only item)."""
    if item.image is None:
        return None
    try:
        with Image.open(item.image) as im:
            im.load()
    except Exception as e:  # OSError, PIL.UnidentifiedImageError, DecompressionBombError, ...
        return f"{type(e).__name__}: {e}"
    return None


def blame(reranker, ds, query, doc):
    """Score `query` against the one document `doc` (None: a plain text probe, to test the query itself).
    -> (None, None) if that works, else (the error, a message naming the dataset, the query and the item)."""
    item = doc or query
    try:
        reranker.score(query.as_input(), [doc.as_input() if doc else PROBE], instruction=ds.instruction)
        return None, None
    except ITEM_ERRORS as err:
        where = f"dataset {ds.name!r}: query {query.id!r}" + (f": candidate {doc.id!r}" if doc else "")
        if why := unreadable(item):
            return err, f"{where}: cannot read image {item.image} ({why})"
        return err, f"{where}{f' (image {item.image})' if item.image else ''}: {type(err).__name__}: {err}"


def score_query(reranker, ds, qid, cands, batch_size, on_error):
    """-> (scores {docid: score} or None when the query itself is dropped, dropped docids, skip messages).

    When the batch fails with an item error, the query is tried against a plain text document and then each
    candidate alone, to name the item at fault: "raise" raises that message, "skip" drops the candidate (and
    re-scores the rest) or the query. A failure no single item reproduces is raised as it is.
    """
    query, docs = ds.queries[qid], [ds.corpus[d] for d in cands]
    try:
        scores = reranker.score(query.as_input(), [d.as_input() for d in docs], instruction=ds.instruction,
                                batch_size=batch_size)
        return dict(zip(cands, (float(s) for s in scores))), [], []
    except ITEM_ERRORS:
        at_fault = [(None, *blame(reranker, ds, query, None))]  # (candidate id or None for the query, error, message)
        if at_fault[0][1] is None:
            at_fault = [(d.id, *blame(reranker, ds, query, d)) for d in docs]
        at_fault = [x for x in at_fault if x[1] is not None]
        if not at_fault:
            raise
        if on_error == "raise":
            raise ValueError(at_fault[0][2]) from at_fault[0][1]
        if at_fault[0][0] is None:  # the query itself
            return None, list(cands), [at_fault[0][2]]
        dropped = {docid for docid, _, _ in at_fault}
        keep = [d for d in cands if d not in dropped]
        scores, more, more_msgs = score_query(reranker, ds, qid, keep, batch_size, on_error) if keep else ({}, [], [])
        return scores, sorted(dropped) + more, [m for _, _, m in at_fault] + more_msgs


def rerank_dataset(ds, reranker, top_k, batch_size=None, on_error="raise", cache=None, bar=None, shard=(0, 1),
                   scored=None):
    """{qid: {"qid", "scores", "dropped", "skipped"}} for every query; cache = (path, key) or None.
    shard = (r, n): only the queries whose index is r modulo n (process r of n under torchrun); scored: records
    found elsewhere (the merged cache, under torchrun), used but not written again."""
    path, key = cache or (None, None)
    done, records = {**(scored or {}), **(read_cache(path) if path else {})}, {}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") if path else contextlib.nullcontext() as f:
        if f and f.tell() == 0:
            f.write(json.dumps({"key": key}) + "\n")
        for qid in list(ds.queries)[shard[0]::shard[1]]:
            cands = ds.candidates(qid)[:top_k]
            record = done.get(qid)
            covered = record and sorted([*(record["scores"] or {}), *record["dropped"]]) == sorted(cands)
            if not covered or record["skipped"]:  # a record with skips is retried: the image may be fixed by now
                scores, dropped, skipped = score_query(reranker, ds, qid, cands, batch_size, on_error) \
                    if cands else ({}, [], [])
                record = {"qid": qid, "scores": scores, "dropped": dropped, "skipped": skipped}
                if f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()  # a crash loses at most the query being scored
            records[qid] = record
            if bar is not None:
                bar.update()
    return records


def build_runs(ds, records, top_k):
    """(first-stage run, reranked run) over the same documents: the candidates minus the dropped ones."""
    first, reranked = {}, {}
    for qid, record in records.items():
        if record["scores"] is None:  # the query itself could not be scored ("skip" mode)
            continue
        dropped = set(record["dropped"])
        first[qid] = {d: s for d, s in ds.run[qid].items() if d not in dropped}
        head = record["scores"]
        tail = ds.candidates(qid)[top_k:]  # below the rerank depth: first-stage order, under every reranked doc
        floor = min(head.values(), default=0.0) - 1.0
        reranked[qid] = {**head, **{d: floor - i for i, d in enumerate(tail)}}
    return first, reranked


def dataset_numbers(ds, records, top_k, metrics):
    """All numbers of one dataset (one entry of the report's "datasets")."""
    first, reranked = build_runs(ds, records, top_k)
    names, ceiling = list(dict.fromkeys([*metrics, ds.main_metric])), f"recall@{top_k}"
    try:
        fs = evaluate(ds.qrels, first, list(dict.fromkeys([*names, ceiling])))
        rr = evaluate(ds.qrels, reranked, names)
        per_query = [evaluate_per_query(ds.qrels, run, [ds.main_metric]) for run in (first, reranked)]
    except ValueError as e:
        raise ValueError(f"dataset {ds.name!r} ({ds.root}): {e}") from None
    skipped = ds.skipped + [m for r in records.values() for m in r["skipped"]]
    return {"task": ds.task, "group": ds.group, "main_metric": ds.main_metric,
            "queries": sum(any(r > 0 for r in ds.qrels.get(q, {}).values()) for q in first),
            "skipped": len(skipped), "skipped_items": skipped,
            "first_stage": {n: fs[n] for n in names}, "reranked": rr, "ceiling": fs[ceiling],
            "depth": max((len(r["scores"] or {}) + len(r["dropped"]) for r in records.values()), default=0),
            # main metric per judged query, [first stage, reranked]: what paired intervals resample (report.py)
            "per_query": {q: [per_query[0][q][ds.main_metric], per_query[1][q][ds.main_metric]]
                          for q in per_query[0]}}


def evaluate_suite(datasets, reranker, top_k=100, metrics=DEFAULT_METRICS, batch_size=None, on_error="raise",
                   cache_dir=None, reranker_key=None, progress=True, runs_dir=None):
    """Rerank and score every dataset -> {"datasets": {name: numbers}, "tasks", "groups", "overall"}.
    `reranker` is anything with Reranker.score's signature; caching needs cache_dir and a reranker_key.
    runs_dir: write <dataset>.first-stage.trec and <dataset>.reranked.trec there."""
    if cache_dir is not None and reranker_key is None:
        raise ValueError("caching needs a reranker_key that identifies the reranker (model, adapter, dtype)")
    if not datasets:
        raise ValueError("evaluate_suite: no datasets to evaluate")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:  # [:top_k] would take -1 as "all but one"
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    per_dataset = {}
    with tqdm(total=sum(len(ds.queries) for ds in datasets), unit="query", disable=not progress) as bar:
        for ds in datasets:
            bar.set_description(ds.name)
            cache = cache_file(cache_dir, ds, reranker_key, top_k) if cache_dir is not None else None
            records = rerank_dataset(ds, reranker, top_k, batch_size, on_error, cache, bar)
            per_dataset[ds.name] = dataset_numbers(ds, records, top_k, metrics)
            if runs_dir is not None:
                for run, kind in zip(build_runs(ds, records, top_k), ("first-stage", "reranked")):
                    write_run(os.path.join(runs_dir, f"{ds.name}.{kind}.trec"), run, f"minigmr-{kind}")
    return {"datasets": per_dataset, **aggregate(per_dataset)}


# ---------------------------------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Rerank a suite's first-stage candidates with a minigmr reranker and "
                                            "report first-stage vs reranked numbers, MRB style.")
    p.add_argument("--suite", choices=("synth", "mrb"), default="synth",
                   help="synth: the synthetic world's suite (generated under data/synth on first use); "
                        "mrb: the MRB datasets in --data-dir (see docs/mrb.md)")
    p.add_argument("--model", help="checkpoint folder (config.json, *.safetensors, tokenizer.json, "
                                   "preprocessor_config.json); default for synth: the world's tiny checkpoint")
    p.add_argument("--adapter", help="LoRA adapter folder (peft or minigmr format), merged into the weights")
    p.add_argument("--data-dir", help="suite folder, one sub-folder per dataset (required for mrb; "
                                      "default for synth: the world's suite)")
    p.add_argument("--datasets", nargs="+", metavar="NAME", help="evaluate only these datasets (by name)")
    p.add_argument("--batch-size", type=int, help="candidates per forward pass (default: the reranker's)")
    p.add_argument("--top-k", type=int, help="rerank depth: only each query's first-stage top k are reranked, and "
                   "the embedder retrieves k (default 100, as MRB; for the default synthetic world, its candidates "
                   "per query)")
    p.add_argument("--first-stage", choices=("run", "embedder"), default="run",
                   help="run: each dataset's run.trec; embedder: retrieve with --embedder (minigmr/embedding.py)")
    p.add_argument("--embedder", help="--first-stage embedder: embedder checkpoint folder (train.py --objective "
                   "embed writes OUT/merged; the synthetic world's is data/synth/embedder)")
    p.add_argument("--embedder-adapter", help="--first-stage embedder: LoRA adapter folder merged into --embedder")
    p.add_argument("--runs-dir", help="where the TREC runs go (default: next to --json as <name>.runs/, else "
                   "runs/ in the cache folder)")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help="ndcg@K, recall@K, mrr@K or map (default: %(default)s); main metrics are always added")
    p.add_argument("--json", metavar="OUT", help="write every number, the skipped items and the config here")
    p.add_argument("--cache-dir", help="score cache folder (default: .eval_cache/ next to --json, else ./.eval_cache)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="an item the reranker cannot take (a missing, unreadable or refused image, a text with a "
                        "control token) or a candidate absent from the corpus: raise (default), or skip the item "
                        "and count it in the table")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: bfloat16 "
                   "on a GPU and on a CPU with AMX / AVX512-BF16, else float32); scores are always fp32")
    p.add_argument("--threads", type=int, help="CPU threads (default: OMP_NUM_THREADS if set, else the cores "
                   "not busy with other work, so that a loaded machine slows down gracefully)")
    p.add_argument("--baseline", metavar="JSON", help="the --json of an earlier run (e.g. the untrained model): "
                   "its reranked numbers are printed next to this run's in the task, group and overall tables")
    p.add_argument("--score", choices=("sft", "cl"), help="sft: p(yes), the softmax over the yes/no logits; cl: "
                   "the yes logit, for InfoNCE-trained models (docs/gmr.md §1.2). Default: what the checkpoint's "
                   "minigmr_reranker.json says (train.py writes it), else sft")
    args = p.parse_args(argv)
    if args.baseline and not os.path.isfile(args.baseline):
        p.error(f"--baseline {args.baseline}: no such file (write one with eval.py --json)")
    for m in args.metrics:
        try:
            parse_metric(m)
        except ValueError as e:
            p.error(str(e))
    if any(v is not None and v < 1 for v in (args.top_k, args.batch_size, args.threads)):
        p.error("--top-k, --batch-size and --threads must be positive")
    if (args.first_stage == "embedder") != (args.embedder is not None) or args.embedder_adapter and not args.embedder:
        p.error("--first-stage embedder needs --embedder PATH, and --embedder / --embedder-adapter need "
                "--first-stage embedder")
    if args.suite == "mrb" and (args.data_dir is None or args.model is None):
        p.error("--suite mrb needs --data-dir (a folder of datasets, docs/mrb.md) and --model")
    for flag in ("--model", "--adapter", "--embedder", "--embedder-adapter"):
        folder = getattr(args, attr := flag[2:].replace("-", "_"))
        if folder is None or os.path.isdir(folder):
            continue
        if os.path.exists(folder):
            p.error(f"{flag} {folder}: not a folder")
        try:  # not a local folder: a hub id (owner/name), from huggingface_hub's cache or the Hub (minigmr/hub.py)
            setattr(args, attr, resolve(folder))
        except (OSError, ImportError) as e:
            p.error(f"{flag} {e}")
    for flag, path, is_folder in (("--json", args.json, False), ("--cache-dir", args.cache_dir, True),
                                  ("--runs-dir", args.runs_dir, True)):
        if path is not None and (why := unwritable(path, is_folder)):
            p.error(f"{flag} {path}: {why}")  # now, not after the scoring
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as e:
            p.error(f"--device {args.device}: not a torch device ({e})")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return args


def versions():
    try:
        mine = importlib.metadata.version("minigmr")
    except importlib.metadata.PackageNotFoundError:
        mine = None
    return {"python": platform.python_version(), "torch": torch.__version__, "minigmr": mine}


def retrieve_first_stage(datasets, args, device, dtype, cache_dir):
    """The datasets with their run replaced by the embedder's top --top-k (corpus embeddings cached)."""
    embedder = Embedder.from_pretrained(args.embedder, adapter=args.embedder_adapter, dtype=dtype, device=device)
    key = {"embedder": fingerprint(args.embedder), "adapter": fingerprint(args.embedder_adapter), "dtype": str(dtype)}
    out = []
    with tqdm(total=sum(len(ds.corpus) for ds in datasets), unit="doc", desc="embedding corpora") as bar:
        for ds in datasets:
            ids, corpus = corpus_embeddings(embedder.embed, ds, embedding_cache_file(cache_dir, ds, key), bar=bar)
            queries = embedder.embed([q.as_input() for q in ds.queries.values()], ds.instruction)
            out.append(replace(ds, run=dict(zip(ds.queries, search(queries, corpus, ids, args.top_k)))))
    return out, key


def process0_first(fn, rank, barrier):
    """fn() on process 0, then on the others (torchrun), which find what it wrote: the world, the embedding cache."""
    if rank != 0:
        barrier()
    out = fn()
    if rank == 0:
        barrier()
    return out


def main(argv=None):
    args = parse_args(argv)
    rank, n_procs = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun sets them
    if n_procs > 1:
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))  # barriers only, around long phases
        if torch.cuda.is_available() and args.device is None:
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    barrier = dist.barrier if n_procs > 1 else (lambda: None)
    set_threads(args.threads)  # CPU work (the world's generation, image preprocessing, a CPU model): idle cores
    if args.model is None or args.data_dir is None:  # synth defaults
        world = process0_first(lambda: ensure_world(DEFAULT_WORLD), rank, barrier)
        if args.data_dir is None and args.top_k is None:
            args.top_k = read_json(os.path.join(world["root"], "world.json"))["n_candidates"]
        args.model, args.data_dir = args.model or world["checkpoint"], args.data_dir or world["suite"]
    args.top_k = args.top_k or 100
    baseline = read_baseline(args.baseline, args.top_k) if args.baseline else None  # fail before scoring
    datasets = load_suite(args.data_dir, on_error=args.on_error, names=args.datasets)
    if args.suite == "mrb" and not args.datasets:
        counts = {t: sum(d.task == t for d in datasets) for t in TASK_TYPES}
        if len(datasets) != MRB_SIZE or any(counts[t] != n for t, n in MRB_KNOWN_COUNTS.items()):
            print(f"note: MRB has {MRB_SIZE} datasets (T->T 14, T->VD 5, IT->IT 3 known); this suite has "
                  f"{len(datasets)}: {counts}", file=sys.stderr)

    device, dtype = default_device_dtype(args.device, getattr(torch, args.dtype) if args.dtype else None)
    reranker = Reranker.from_pretrained(args.model, adapter=args.adapter, dtype=dtype, device=device,
                                        score_type=args.score)
    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.json)) if args.json else ".",
                                               ".eval_cache")
    runs_dir = args.runs_dir or (os.path.splitext(args.json)[0] + ".runs" if args.json else
                                 os.path.join(cache_dir, "runs"))
    key = {"model": fingerprint(args.model), "adapter": fingerprint(args.adapter), "dtype": str(dtype),
           "score": reranker.score_type}
    start = time.time()
    if args.first_stage == "embedder":
        datasets, key["first_stage"] = process0_first(
            lambda: retrieve_first_stage(datasets, args, device, dtype, cache_dir), rank, barrier)
    if n_procs > 1:  # each process scores its share of every dataset's queries into its own cache file
        paths = [cache_file(cache_dir, ds, key, args.top_k) for ds in datasets]
        process0_first(lambda: [read_cache(path) for path, _ in paths], rank, barrier)  # 0 mends torn tails first
        for ds, (path, ds_key) in zip(datasets, paths):
            rerank_dataset(ds, reranker, args.top_k, args.batch_size, args.on_error, (f"{path}.rank{rank}", ds_key),
                           shard=(rank, n_procs), scored=read_cache(path))
        barrier()
        if rank == 0:
            for path, _ in paths:
                merge_rank_caches(path, n_procs)
        barrier()
        dist.destroy_process_group()
        if rank != 0:
            return None  # process 0 reads the merged caches: the single-process numbers, nothing scored twice
    results = evaluate_suite(datasets, reranker, args.top_k, args.metrics, args.batch_size, args.on_error,
                             cache_dir, key, runs_dir=runs_dir)
    seconds = time.time() - start
    print(f"score: {reranker.score_type} ({'p(yes)' if reranker.score_type == 'sft' else 'the yes logit'})")
    print(report(results, args.top_k, args.metrics, baseline))
    print(f"\n{len(datasets)} dataset(s), {sum(len(d.queries) for d in datasets)} queries in {seconds:.1f} s; "
          f"runs (TREC) in {runs_dir}, scores cached in {cache_dir}" + (f", numbers in {args.json}" if args.json else ""))
    results["config"] = {"suite": args.suite, "data_dir": os.path.abspath(args.data_dir),
                         "model": os.path.abspath(args.model),
                         "adapter": os.path.abspath(args.adapter) if args.adapter else None,
                         "first_stage": "run.trec" if args.first_stage == "run" else os.path.abspath(args.embedder),
                         "runs_dir": os.path.abspath(runs_dir),
                         "top_k": args.top_k, "metrics": args.metrics, "datasets": [d.name for d in datasets],
                         "on_error": args.on_error, "device": str(device), "dtype": str(dtype), "processes": n_procs,
                         "score": reranker.score_type, "batch_size": args.batch_size, "seconds": seconds,
                         "versions": versions()}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
