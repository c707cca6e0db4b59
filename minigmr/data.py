"""The on-disk format of minigmr's reranking evaluation datasets, and the JSONL and item readers every data file shares.

An item (a query or a document) is text, one image, or both (MRB has at most one image per item). The training data
format (minigmr/train_data.py) reuses the item parser below.

A reranking evaluation dataset is one folder:

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
  - Every item needs an "id" (a non-empty string, unique in its file) and a non-blank "text", an "image",
    or both; no other field is allowed. Blank lines are ignored. A text may not contain a Qwen2.5 control
    token such as <|image_pad|> (tokenizer.special_token), and an image path must stay inside the dataset folder.
  - Every query id in qrels.tsv and run.trec must be in queries.jsonl. Every run candidate must be in
    corpus.jsonl; qrels may name documents outside the corpus (they still count as relevant, so recall
    shows the first stage's ceiling). A query without candidates in run.trec gets an empty candidate list.
  - The candidate order is trec_eval's (score descending, ties by doc id descending); the rank column is
    not read. What a suite reranks is exactly the run's candidates (MRB: GME-2B's top 100).
  A suite is a folder whose sub-folders (hidden ones aside) are all such datasets.

Files are UTF-8 (a leading BOM is allowed). Errors name the file, the line and the id. Missing images are checked
by existence only (cheap).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import read_json, read_json_object, write_json
from .metrics import Qrels, Run, parse_metric, rank, read_lines, read_qrels, read_run, write_qrels, write_run
from .tokenizer import special_token

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


# ---------------------------------------------------------------------------------------------------- JSON lines
def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line of a JSONL file; errors name the file and line."""
    for n, line in read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


# ---------------------------------------------------------------------------------------------------- items
def record_id(obj: dict, where: str) -> str:
    """The record's "id": a non-empty string, else a ValueError naming `where`."""
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"{where}: missing or empty 'id' (a non-empty string), got {rid!r}")
    return rid


def parse_item(obj: Any, item_id: str, where: str, base: str, allowed: tuple[str, ...] = ("text", "image")) -> Item:
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
    text = text if text and text.strip() else None  # a blank text is no text, as "" is
    if not text and not image:
        raise ValueError(f"{where}: item has neither text nor image")
    return Item(item_id, text, os.path.abspath(os.path.join(base, image)) if image else None)


def inside(path: str, root: str) -> bool:
    """Whether `path` (made absolute, `..` resolved, symlinks kept) lies inside the folder `root`."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    return os.path.commonpath([path, root]) == root


def missing_image(item: Item) -> bool:
    return item.image is not None and not os.path.isfile(item.image)


# ---------------------------------------------------------------------------------------------------- datasets
def _read_meta(path: str) -> dict:
    meta = read_json_object(path, hint="; a dataset folder needs meta.json (see minigmr/data.py)")
    missing = [k for k in META_FIELDS if k not in meta]
    unknown = sorted(set(meta) - set(META_FIELDS) - {"source"})
    if missing or unknown:
        raise ValueError(f"{path}: missing field(s) {missing}, unknown field(s) {unknown}")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ValueError(f"{path}: '{key}' must be a string, got {type(value).__name__}")
        if key in ("name", "instruction") and not value.strip():
            raise ValueError(f"{path}: '{key}' is blank; it must be a non-empty string")
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
    for n, line in read_lines(path):
        cols = line.split()
        for key in ((cols[0],), (cols[0], cols[2])) if len(cols) > 2 else ():
            if key in keys and key not in found:
                found[key] = n
    return found


def load_dataset(path: str | os.PathLike, check_images: bool = True, on_error: str = "raise") -> Dataset:
    """Load and validate one dataset folder.

    on_error="skip" drops, instead of raising: items whose image is missing or whose text holds a control token
    (a query takes its qrels and candidates with it) and run candidates absent from the corpus; each drop adds
    its message to dataset.skipped, so the caller can report the count. Every other problem always raises.
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

    items, dropped = {"queries.jsonl": {}, "corpus.jsonl": {}}, {"queries.jsonl": {}, "corpus.jsonl": {}}  # id: why
    for name in items:
        file = os.path.join(root, name)
        for n, obj in read_jsonl(file):
            item_id = record_id(obj, f"{file}:{n}")
            where = f"{file}:{n}: id {item_id!r}"
            if item_id in items[name] or item_id in dropped[name]:
                raise ValueError(f"{where}: duplicate id")
            item = parse_item(obj, item_id, where, root, allowed=("id", "text", "image"))
            if item.image and not inside(item.image, root):  # as write_dataset refuses it
                raise ValueError(f"{where}: image {obj['image']!r} is outside the dataset folder {root}")
            token = special_token(item.text)
            if token:
                bad(f"{where}: text contains the control token {token}")
                dropped[name][item_id] = "its text contains a control token"
            elif check_images and missing_image(item):
                bad(f"{where}: image not found: {item.image}")
                dropped[name][item_id] = "its image is missing"
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
        why = dropped["corpus.jsonl"].get(docid, "it is not in corpus.jsonl")
        bad(f"{run_file}:{lines[(qid, docid)]}: query {qid!r}: candidate {docid!r} dropped: {why}")
    run = {q: {d: s for d, s in tables["run.trec"].get(q, {}).items() if d in corpus} for q in queries}
    return Dataset(meta["name"], meta["task"], meta["instruction"], meta["main_metric"], queries, corpus,
                   tables["qrels.tsv"], run, root, meta.get("source"), skipped)


def load_suite(path: str | os.PathLike, check_images: bool = True, on_error: str = "raise",
               names: list[str] | None = None) -> list[Dataset]:
    """Load every dataset folder of a suite folder, or only those whose meta.json "name" is in `names` (the
    others' files are not read further, so an error in one does not stop another); sorted by name."""
    if not os.path.isdir(path):
        raise ValueError(f"{path}: {'not a folder' if os.path.exists(path) else 'suite folder not found'}")
    if os.path.isfile(os.path.join(path, "meta.json")):
        raise ValueError(f"{path} is a dataset folder (it has meta.json), not a suite: give the folder that holds "
                         "the dataset folders")
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
    """Write a dataset folder and load it back, which validates it; returns the Dataset.

    queries/corpus: Items (or {id: Item}); an image path is relative to `path` or absolute inside it, and the
    image file must already be there (the caller saves it, e.g. under path/images/).
    """
    root = Path(os.path.abspath(path))
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
                    image = Path(os.path.normpath(root / item.image))  # a relative path is relative to root
                    if not inside(image, root):
                        raise ValueError(f"{file}: id {item.id!r}: image {item.image} is outside the dataset {root}")
                    obj["image"] = image.relative_to(root).as_posix()
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    write_qrels(root / "qrels.tsv", qrels)
    write_run(root / "run.trec", run, run_tag)
    return load_dataset(root)
