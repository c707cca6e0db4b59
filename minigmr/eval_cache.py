"""eval.py's caches: reranker scores and corpus embeddings per dataset, append-only JSONL, so that an interrupted
run resumes where it stopped.

A cache file is named by a digest of its key: the model / adapter / embedder (path and file stats, so retraining
into the same folder gets a new key), the dtype, the rerank depth and a hash of the dataset files. Score files hold
one line per query (written as soon as the query is scored); embedding files one line per chunk of documents, the
vectors as base64 of their fp32 bytes (exact).
"""
import base64
import contextlib
import hashlib
import json
import os
import re

import numpy as np
import torch

from .data import read_jsonl


def fingerprint(path):
    """A model/adapter folder's identity: its absolute path and the (name, size, mtime) of its files."""
    if path is None:
        return None
    path = os.path.abspath(path)
    stats = [(f, os.stat(os.path.join(path, f))) for f in sorted(os.listdir(path))]
    return [path] + [[f, s.st_size, s.st_mtime_ns] for f, s in stats if os.path.isfile(os.path.join(path, f))]


def dataset_hash(ds):
    """sha256 of the files the scores depend on. qrels.tsv is left out on purpose (fixing a judgement must not
    re-score anything); image files are not hashed (too big), only the paths that name them."""
    h = hashlib.sha256()
    for name in ("meta.json", "queries.jsonl", "corpus.jsonl", "run.trec"):
        h.update(name.encode())
        with open(os.path.join(ds.root, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def cache_file(cache_dir, ds, reranker_key, top_k):
    """-> (path, key): one file per (dataset, reranker, depth), named by a digest of the key."""
    key = {"reranker": reranker_key, "top_k": top_k, "dataset": ds.name, "dataset_sha256": dataset_hash(ds)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', ds.name)}-{digest}.jsonl"), key


def cut_torn_tail(path):
    """Whatever follows the last newline of an append-only cache file is an interrupted write: cut it off (so
    the next append starts on a fresh line); it is computed again."""
    with open(path, "r+b") as f:
        end = f.read().rfind(b"\n") + 1
        if end < f.tell():
            f.truncate(end)


def read_cache(path):
    """{qid: record} of a score cache file; the last record of a query wins; a torn last line is re-scored."""
    if not os.path.exists(path):
        return {}
    cut_torn_tail(path)
    try:  # the first line is a header with the key (no "qid"), for people reading the cache folder
        return {record["qid"]: record for _, record in read_jsonl(path) if "qid" in record}
    except ValueError as e:
        raise ValueError(f"{e}; delete the file to re-score") from None


def merge_rank_caches(path, world):
    """Append the records of the per-process cache files `path.rank<r>` (eval.py under torchrun) to `path`, then
    delete them: the next reader, one process or many, finds every query scored."""
    parts = [f"{path}.rank{r}" for r in range(world) if os.path.exists(f"{path}.rank{r}")]
    if os.path.exists(path):
        cut_torn_tail(path)
    with open(path, "a", encoding="utf-8") as out:
        for part in parts:
            cut_torn_tail(part)
            with open(part, encoding="utf-8") as f:
                header, *records = f.readlines() or [""]
            if out.tell() == 0:
                out.write(header)  # the key line, the same in every part
            out.writelines(records)
    for part in parts:
        os.remove(part)


def embedding_cache_file(cache_dir, ds, embedder_key):
    """-> (path, key) of a dataset's corpus embeddings under one embedder."""
    h = hashlib.sha256()
    with open(os.path.join(ds.root, "corpus.jsonl"), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    key = {"embedder": embedder_key, "dataset": ds.name, "corpus_sha256": h.hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', ds.name)}-corpus-{digest}.jsonl"), key


def corpus_embeddings(embed, ds, cache=None, chunk=256, bar=None):
    """(doc ids in corpus order, (n, D) fp32 unit vectors) of a dataset's corpus, `embed(items)` called on chunks
    of `chunk` documents not cached yet; cache = (path, key) or None."""
    path, key = cache or (None, None)
    vectors = {}
    if path and os.path.exists(path):
        cut_torn_tail(path)
        try:
            for n, record in read_jsonl(path):
                if "ids" in record:
                    raw = np.frombuffer(base64.b64decode(record["fp32"]), dtype=np.float32)
                    vectors.update(zip(record["ids"], torch.from_numpy(raw.copy()).view(len(record["ids"]), -1)))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not an embedding cache ({e}); delete the file to embed again") from None
    ids = list(ds.corpus)
    todo = [d for d in ids if d not in vectors]
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") if path else contextlib.nullcontext() as f:
        if path and f.tell() == 0:
            f.write(json.dumps({"key": key}) + "\n")
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            try:
                e = embed([ds.corpus[d].as_input() for d in part]).float()  # (chunk, D)
            except ValueError:
                for d in part:  # the error names a position in the chunk: find the document, name it by its id
                    try:
                        embed([ds.corpus[d].as_input()])
                    except ValueError as one:
                        raise ValueError(f"{ds.name}: corpus document {d!r}: {one}") from None
                raise
            if path:
                f.write(json.dumps({"ids": part, "fp32": base64.b64encode(e.numpy().tobytes()).decode()}) + "\n")
                f.flush()  # a crash loses at most the chunk being embedded
            vectors.update(zip(part, e))
            if bar is not None:
                bar.update(len(part))
    return ids, torch.stack([vectors[d] for d in ids])

