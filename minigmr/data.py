"""The two on-disk data formats of minigmr: reranking evaluation datasets, and training data.

An item (a query or a document) is text, one image, or both (MRB has at most one image per item).

(a) A reranking evaluation dataset is one folder:

    <dataset>/
      meta.json      {"name": str, "task": str, "instruction": str, "main_metric": str, "source": str (optional)}
      queries.jsonl  one JSON object per line: {"id": str, "text": str (optional), "image": str (optional)}
      corpus.jsonl   the documents, same shape as queries.jsonl
      qrels.tsv      TREC qrels, one judgement per line: "qid 0 docid rel" (graded integer rel, >= 1 = relevant)
      run.trec       first-stage candidates, TREC run: "qid Q0 docid rank score tag"
      images/...     the image files, referenced by paths relative to the dataset folder

  - task is one of TASK_TYPES, written query->document modality (T text, I image, VD visual document,
    IT text+image), e.g. "T->VD". TASK_GROUP gives MRB's grouping: single-modal (T->T, I->I),
    cross-modal (T->I, T->VD, I->T), fused-modal (T->IT, IT->T, IT->I, IT->IT).
  - instruction is the task instruction given to the reranker with every (query, document) pair.
  - main_metric is the number the dataset reports, as minigmr.metrics names it: "ndcg@10", "recall@5", ...
  - Every item needs an "id" (a non-empty string, unique in its file) and a non-empty "text", an "image",
    or both; no other field is allowed. Blank lines are ignored.
  - Every query id in qrels.tsv and run.trec must be in queries.jsonl. Every run candidate must be in
    corpus.jsonl; qrels may name documents outside the corpus (they still count as relevant, so recall
    shows the first stage's ceiling). A query without candidates in run.trec gets an empty candidate list.
  - The candidate order is trec_eval's (score descending, ties by doc id descending); the rank column is
    not read. What a suite reranks is exactly the run's candidates (MRB: GME-2B's top 100).
  A suite is a folder whose sub-folders (hidden ones aside) are all such datasets.

(b) Training data is one JSONL file, one record per line:

    {"id": str, "instruction": str,
     "query": {"text": str, "image": str} or a bare string (= text),
     "positives": [doc, ...],          at least one
     "negatives": [doc, ...],          optional: random/easy negatives
     "hard_negatives": [doc, ...]}     optional: mined hard negatives

  where a doc is a bare string (= text) or {"text": str, "image": str}, and image paths are relative to the
  JSONL file's folder. A doc may not be both a positive and a negative of the same record.

Errors name the file, the line and the id. Missing images are checked by existence only (cheap).
"""

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .metrics import Qrels, Run, parse_metric, rank, read_qrels, read_run, write_qrels, write_run

TASK_TYPES = ("T->T", "I->I", "T->I", "T->VD", "I->T", "T->IT", "IT->T", "IT->I", "IT->IT")
TASK_GROUP = {"T->T": "single-modal", "I->I": "single-modal",
              "T->I": "cross-modal", "T->VD": "cross-modal", "I->T": "cross-modal",
              "T->IT": "fused-modal", "IT->T": "fused-modal", "IT->I": "fused-modal", "IT->IT": "fused-modal"}
META_FIELDS = ("name", "task", "instruction", "main_metric")


@dataclass
class Item:
    id: str
    text: str | None = None
    image: str | None = None  # absolute path once loaded

    def as_input(self) -> dict:
        """{"text"?, "image"?} without the half it lacks: a query/document as Reranker and group_logits take it."""
        return {k: v for k, v in (("text", self.text), ("image", self.image)) if v is not None}


@dataclass
class Dataset:
    name: str
    task: str
    instruction: str
    main_metric: str
    queries: dict[str, Item]
    corpus: dict[str, Item]
    qrels: Qrels
    run: Run  # first-stage scores, one entry (maybe empty) per query
    root: str  # absolute path of the dataset folder
    source: str | None = None
    skipped: list[str] = field(default_factory=list)  # on_error="skip": one message per dropped item/candidate

    @property
    def group(self) -> str:
        return TASK_GROUP[self.task]

    def candidates(self, qid: str) -> list[str]:
        """The query's first-stage candidates in trec_eval order."""
        return rank(self.run[qid])


@dataclass
class TrainRecord:
    id: str
    instruction: str
    query: Item
    positives: list[Item]  # at least one
    negatives: list[Item] = field(default_factory=list)
    hard_negatives: list[Item] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- JSON files
def read_json(path: str | os.PathLike, hint: str = "") -> Any:
    """The JSON value of a file; a missing or malformed file is a ValueError naming the path (then `hint`)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found{hint}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}){hint}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a JSONL file; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


# ---------------------------------------------------------------------------------------------------- datasets
def _record_id(obj: dict, where: str) -> str:
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"{where}: missing or empty 'id' (a non-empty string), got {rid!r}")
    return rid


def _item(obj: Any, item_id: str, where: str, base: str, allowed: tuple[str, ...] = ("text", "image")) -> Item:
    """Parse one item: a bare string (= text) or an object with "text" and/or "image" (relative to base)."""
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a string or an object with 'text'/'image', got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
    text, image = obj.get("text"), obj.get("image")
    for key, value in (("text", text), ("image", image)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not text and not image:
        raise ValueError(f"{where}: item has neither text nor image")
    return Item(item_id, text or None, os.path.abspath(os.path.join(base, image)) if image else None)


def _missing_image(item: Item) -> bool:
    return item.image is not None and not os.path.isfile(item.image)


def _read_meta(path: str) -> dict:
    meta = read_json(path, hint="; a dataset folder needs meta.json (see minigmr/data.py)")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    missing = [k for k in META_FIELDS if k not in meta]
    unknown = sorted(set(meta) - set(META_FIELDS) - {"source"})
    if missing or unknown:
        raise ValueError(f"{path}: missing field(s) {missing}, unknown field(s) {unknown}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: '{key}' must be a string, got {type(value).__name__}")
    if meta["task"] not in TASK_TYPES:
        raise ValueError(f"{path}: unknown task type {meta['task']!r}; expected one of {', '.join(TASK_TYPES)}")
    try:
        parse_metric(meta["main_metric"])
    except ValueError as e:
        raise ValueError(f"{path}: main_metric: {e}") from None
    return meta


def _first_lines(path: str, keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], int]:
    """First line number of each key, (qid,) or (qid, docid), in a qrels/run file. Used on error paths only,
    since read_qrels/read_run return plain dicts."""
    keys, found = set(keys), {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            for key in ((cols[0],), (cols[0], cols[2])) if len(cols) > 2 else ():
                if key in keys and key not in found:
                    found[key] = n
    return found


def load_dataset(path: str | os.PathLike, check_images: bool = True, on_error: str = "raise") -> Dataset:
    """Load and validate one dataset folder (format (a)).

    on_error="skip" drops, instead of raising: items whose image is missing (a query takes its qrels and
    candidates with it) and run candidates absent from the corpus; each drop adds its message to
    dataset.skipped, so the caller can report the count. Every other problem always raises.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    root = os.path.abspath(path)
    meta = _read_meta(os.path.join(root, "meta.json"))
    skipped = []

    def bad(message):  # a problem that "skip" may drop
        message = f"dataset {meta['name']!r}: {message}"
        if on_error == "raise":
            raise ValueError(message)
        skipped.append(message)

    items, dropped = {"queries.jsonl": {}, "corpus.jsonl": {}}, {"queries.jsonl": set(), "corpus.jsonl": set()}
    for name in items:
        file = os.path.join(root, name)
        for n, obj in read_jsonl(file):
            item_id = _record_id(obj, f"{file}:{n}")
            where = f"{file}:{n}: id {item_id!r}"
            if item_id in items[name] or item_id in dropped[name]:
                raise ValueError(f"{where}: duplicate id")
            item = _item(obj, item_id, where, root, allowed=("id", "text", "image"))
            if check_images and _missing_image(item):
                bad(f"{where}: image not found: {item.image}")
                dropped[name].add(item_id)
            else:
                items[name][item_id] = item
    queries, corpus = items["queries.jsonl"], items["corpus.jsonl"]

    tables = {}  # qrels and run, restricted to the loaded queries
    for name, reader in (("qrels.tsv", read_qrels), ("run.trec", read_run)):
        file = os.path.join(root, name)
        table = reader(file)
        unknown = [q for q in table if q not in queries and q not in dropped["queries.jsonl"]]
        if unknown:
            line = _first_lines(file, [(unknown[0],)])[(unknown[0],)]
            raise ValueError(f"{file}:{line}: query {unknown[0]!r} is not in queries.jsonl")
        tables[name] = {q: docs for q, docs in table.items() if q in queries}

    run_file = os.path.join(root, "run.trec")
    absent = [(q, d) for q, docs in tables["run.trec"].items() for d in docs if d not in corpus]
    lines = _first_lines(run_file, absent) if absent else {}
    for qid, docid in sorted(absent, key=lines.get):  # in file order, so "raise" reports the first one
        why = "its image is missing" if docid in dropped["corpus.jsonl"] else "it is not in corpus.jsonl"
        bad(f"{run_file}:{lines[(qid, docid)]}: query {qid!r}: candidate {docid!r} dropped: {why}")
    run = {q: {d: s for d, s in tables["run.trec"].get(q, {}).items() if d in corpus} for q in queries}
    return Dataset(meta["name"], meta["task"], meta["instruction"], meta["main_metric"], queries, corpus,
                   tables["qrels.tsv"], run, root, meta.get("source"), skipped)


def load_suite(path: str | os.PathLike, check_images: bool = True, on_error: str = "raise",
               names: list[str] | None = None) -> list[Dataset]:
    """Load every dataset folder of a suite folder, or only those whose meta.json "name" is in `names` (the
    others' files are not read further, so an error in one does not stop another); sorted by name."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: suite folder not found")
    folders = [os.path.join(path, d) for d in sorted(os.listdir(path))
               if not d.startswith(".") and os.path.isdir(os.path.join(path, d))]
    if not folders:
        raise ValueError(f"{path}: no dataset folders in this suite")
    if names:
        named = {}  # meta.json "name" -> folder, reading nothing else
        for f in folders:
            meta = read_json(os.path.join(f, "meta.json")) if os.path.isfile(os.path.join(f, "meta.json")) else {}
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                named.setdefault(meta["name"], f)
        unknown = sorted(set(names) - set(named))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown} in {path}; available: {', '.join(named)}")
        folders = [named[n] for n in set(names)]
    datasets = sorted((load_dataset(f, check_images, on_error) for f in folders), key=lambda d: d.name)
    for a, b in zip(datasets, datasets[1:]):
        if a.name == b.name:
            raise ValueError(f"{path}: two datasets are named {a.name!r} ({a.root} and {b.root})")
    return datasets


def write_dataset(path: str | os.PathLike, *, name: str, task: str, instruction: str, main_metric: str,
                  queries: list[Item] | dict[str, Item], corpus: list[Item] | dict[str, Item],
                  qrels: Qrels, run: Run, source: str | None = None, run_tag: str = "first_stage") -> Dataset:
    """Write a dataset folder (format (a)) and load it back, which validates it; returns the Dataset.

    queries/corpus: Items (or {id: Item}); an image path is relative to `path` or absolute inside it, and the
    image file must already be there (the caller saves it, e.g. under path/images/).
    """
    root = Path(path).absolute()
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "task": task, "instruction": instruction, "main_metric": main_metric}
    if source is not None:
        meta["source"] = source
    write_json(root / "meta.json", meta)
    for file, items in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        with open(root / file, "w", encoding="utf-8") as f:
            for item in items.values() if isinstance(items, dict) else items:
                obj = {"id": item.id}
                if item.text is not None:
                    obj["text"] = item.text
                if item.image is not None:
                    image = Path(item.image)
                    if image.is_absolute():
                        if not image.is_relative_to(root):
                            raise ValueError(f"{file}: id {item.id!r}: image {image} is outside the dataset {root}")
                        image = image.relative_to(root)
                    obj["image"] = image.as_posix()
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    write_qrels(root / "qrels.tsv", qrels)
    write_run(root / "run.trec", run, run_tag)
    return load_dataset(root)


# ---------------------------------------------------------------------------------------------------- training data
def load_training_data(path: str | os.PathLike, check_images: bool = True) -> list[TrainRecord]:
    """Load and validate a training JSONL file (format (b)) -> [TrainRecord]."""
    base = os.path.dirname(os.path.abspath(path))

    def doc(obj: Any, item_id: str, where: str) -> Item:
        item = _item(obj, item_id, where, base)
        if check_images and _missing_image(item):
            raise ValueError(f"{where}: image not found: {item.image}")
        return item

    records, seen = [], set()
    for n, obj in read_jsonl(path):
        rid = _record_id(obj, f"{path}:{n}")
        where = f"{path}:{n}: id {rid!r}"
        if rid in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(rid)
        unknown = sorted(set(obj) - {"id", "instruction", "query", "positives", "negatives", "hard_negatives"})
        missing = [k for k in ("instruction", "query", "positives") if k not in obj]
        if unknown or missing:
            raise ValueError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        if not isinstance(obj["instruction"], str):
            raise ValueError(f"{where}: 'instruction' must be a string")
        query = doc(obj["query"], rid, f"{where}: query")
        docs = {}
        for key in ("positives", "negatives", "hard_negatives"):
            if not isinstance(obj.get(key, []), list):
                raise ValueError(f"{where}: '{key}' must be a list of docs")
            docs[key] = [doc(d, f"{rid}/{key}[{i}]", f"{where}: {key}[{i}]") for i, d in enumerate(obj.get(key, []))]
        if not docs["positives"]:
            raise ValueError(f"{where}: 'positives' is empty; a record needs at least one positive")
        positive_keys = {_key(d) for d in docs["positives"]}
        for key in ("negatives", "hard_negatives"):
            for i, d in enumerate(docs[key]):
                if _key(d) in positive_keys:
                    raise ValueError(f"{where}: {key}[{i}]: this doc is also one of the record's positives")
        records.append(TrainRecord(rid, obj["instruction"], query, **docs))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _key(item: Item) -> tuple[str | None, str | None]:
    """Documents are the same document when text and image agree (ids differ across records)."""
    return item.text, item.image


def _distinct(n: int, k: int, rng: torch.Generator) -> list[int]:
    """k distinct ints uniform in range(n), k <= n, in draw order. Rejection sampling keeps a draw O(k)
    rather than O(n) on a corpus of millions."""
    if 2 * k >= n:
        return torch.randperm(n, generator=rng)[:k].tolist()
    picked = {}  # dict: insertion-ordered set
    while len(picked) < k:
        for i in torch.randint(n, (k,), generator=rng).tolist():
            if len(picked) < k:
                picked.setdefault(i)
    return list(picked)


def _take(items: list, k: int, rng: torch.Generator) -> list:
    """Up to k of items without replacement (all of them, shuffled, when there are fewer than k)."""
    return [items[i] for i in _distinct(len(items), min(max(k, 0), len(items)), rng)]


class NegativeSampler:
    """Builds one training group per record: one positive plus N negatives (GMR: N = 16, random : hard = 1 : 1).

    Of the N negatives, n_hard = floor(N * hard_ratio + 0.5) come from the record's hard_negatives, then
    from its negatives if there are too few hard ones; if both together are still too few they are reused
    (each pass over them without replacement). The other N - n_hard (all N when the record has neither) are
    random documents of the corpus, the deduplicated set of every document of every record, excluding this
    record's positives; drawn without replacement unless the corpus is too small. Negatives are returned
    hard first, then random. Deterministic given the torch.Generator (or the seed when rng is None).
    """

    def __init__(self, records: list[TrainRecord], num_negatives: int, hard_ratio: float = 0.5, seed: int = 0):
        if num_negatives < 0 or not 0.0 <= hard_ratio <= 1.0:
            raise ValueError(f"need num_negatives >= 0 and 0 <= hard_ratio <= 1, got {num_negatives}, {hard_ratio}")
        self.num_negatives = num_negatives
        self.num_hard = math.floor(num_negatives * hard_ratio + 0.5)
        self.corpus, self._index = [], {}  # [Item], {(text, image): position in corpus}
        for r in records:
            for doc in r.positives + r.negatives + r.hard_negatives:
                if _key(doc) not in self._index:
                    self._index[_key(doc)] = len(self.corpus)
                    self.corpus.append(doc)
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, record: TrainRecord, rng: torch.Generator | None = None) -> tuple[Item, list[Item]]:
        """-> (positive Item, [N negative Items])."""
        rng = self.generator if rng is None else rng
        positive = record.positives[_distinct(len(record.positives), 1, rng)[0]]
        hard = _take(record.hard_negatives, self.num_hard, rng)
        hard += _take(record.negatives, self.num_hard - len(hard), rng)
        pool = record.hard_negatives + record.negatives
        while pool and len(hard) < self.num_hard:  # pool too small: reuse it
            hard += _take(pool, self.num_hard - len(hard), rng)

        # random part: draw positions among the corpus minus the record's positives, then map them back
        excluded = sorted({self._index[_key(p)] for p in record.positives if _key(p) in self._index})
        available, need = len(self.corpus) - len(excluded), self.num_negatives - len(hard)
        if need and available == 0:
            raise ValueError(f"record {record.id!r}: the corpus has no document besides its positives to sample")
        picks = []
        while len(picks) < need:  # more than once only when the corpus is too small: with replacement
            picks += _distinct(available, min(need - len(picks), available), rng)
        randoms = []
        for i in picks:
            for e in excluded:  # i-th non-excluded position -> corpus position
                if e > i:
                    break
                i += 1
            randoms.append(self.corpus[i])
        return positive, hard + randoms
