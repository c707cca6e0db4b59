"""minigmr's training data: the JSONL format, the negative sampler, and the global batch of every step.

Training data is one JSONL file, one record per line:

    {"id": str, "instruction": str,
     "query": {"text": str, "image": str} or a bare string (= text),
     "positives": [doc, ...],          at least one
     "negatives": [doc, ...],          optional: random/easy negatives
     "hard_negatives": [doc, ...],     optional: mined hard negatives
     "description": str}               optional: a longer text about the first positive (train.py --objective
                                       embed: VladVA's next-token term, written after that document's prompt)

where a doc is a bare string (= text) or {"text": str, "image": str}, and image paths are relative to the JSONL
file's folder. The instruction is a non-empty string. A doc may not be both a positive and a negative of the same
record, nor appear twice in one list (it would be sampled twice as often). Errors name the file, the line and the
id; blank lines are ignored.

A training group is one record's (instruction, query) with one positive and N negatives (NegativeSampler). The
global batch of optimizer step k (GlobalBatches) is a pure function of (seed, k): every DDP rank draws the same one
and takes its slice, and a resumed run draws what the uninterrupted run would have, without saving sampler state.
"""
import functools
import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .data import Item, missing_image, parse_item, read_jsonl, record_id


@dataclass
class TrainRecord:
    id: str
    instruction: str
    query: Item
    positives: list[Item]  # at least one
    negatives: list[Item] = field(default_factory=list)
    hard_negatives: list[Item] = field(default_factory=list)
    description: str | None = None  # a longer text about positives[0], for the embedder's next-token term


class TrainGroup(NamedTuple):
    """What one training prompt set is built from: the record (instruction, query), a positive, N negatives."""
    record: TrainRecord
    positive: Item
    negatives: list[Item]


def load_training_data(path: str | os.PathLike, check_images: bool = True) -> list[TrainRecord]:
    """Load and validate a training JSONL file (the format above) -> [TrainRecord]."""
    base = os.path.dirname(os.path.abspath(path))

    def doc(obj: Any, item_id: str, where: str) -> Item:
        item = parse_item(obj, item_id, where, base)
        if check_images and missing_image(item):
            raise ValueError(f"{where}: image not found: {item.image}")
        return item

    records, seen = [], set()
    for n, obj in read_jsonl(path):
        rid = record_id(obj, f"{path}:{n}")
        where = f"{path}:{n}: id {rid!r}"
        if rid in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(rid)
        unknown = sorted(set(obj) - {"id", "instruction", "query", "positives", "negatives", "hard_negatives",
                                    "description"})
        missing = [k for k in ("instruction", "query", "positives") if k not in obj]
        if unknown or missing:
            raise ValueError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        if not isinstance(obj["instruction"], str) or not obj["instruction"].strip():
            raise ValueError(f"{where}: 'instruction' must be a string (not empty), got {obj['instruction']!r}")
        if "description" in obj and (not isinstance(obj["description"], str) or not obj["description"].strip()):
            raise ValueError(f"{where}: 'description' must be a non-empty string, got {obj['description']!r}")
        query = doc(obj["query"], rid, f"{where}: query")
        docs = {}
        for key in ("positives", "negatives", "hard_negatives"):
            if not isinstance(obj.get(key, []), list):
                raise ValueError(f"{where}: '{key}' must be a list of docs")
            docs[key] = [doc(d, f"{rid}/{key}[{i}]", f"{where}: {key}[{i}]") for i, d in enumerate(obj.get(key, []))]
            first = {}
            for i, d in enumerate(docs[key]):
                if first.setdefault(_key(d), i) != i:
                    raise ValueError(f"{where}: {key}[{i}] repeats {key}[{first[_key(d)]}]; list each doc once")
        if not docs["positives"]:
            raise ValueError(f"{where}: 'positives' is empty; a record needs at least one positive")
        positive_keys = {_key(d) for d in docs["positives"]}
        for key in ("negatives", "hard_negatives"):
            for i, d in enumerate(docs[key]):
                if _key(d) in positive_keys:
                    raise ValueError(f"{where}: {key}[{i}]: this doc is also one of the record's positives")
        records.append(TrainRecord(rid, obj["instruction"], query, **docs, description=obj.get("description")))
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
        if type(num_negatives) is not int or num_negatives < 0:
            raise ValueError(f"num_negatives must be an int >= 0, got {num_negatives!r}")
        if not isinstance(hard_ratio, (int, float)) or not 0.0 <= hard_ratio <= 1.0:
            raise ValueError(f"hard_ratio must be a number in [0, 1], got {hard_ratio!r}")
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


def seeded(*key) -> torch.Generator:
    """A torch.Generator seeded by a hash of key: seeded(seed, "negatives", step) gives every rank, and a resumed
    run, the same stream without saving any generator state."""
    digest = hashlib.sha256("/".join(map(str, key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@functools.lru_cache(maxsize=2)  # consecutive steps draw from the same one or two epochs
def epoch_order(seed: int, n_records: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits the records: a fresh seeded permutation every epoch."""
    return torch.randperm(n_records, generator=seeded(seed, "order", epoch)).tolist()


class GlobalBatches:
    """The global batch of every optimizer step: `batch_size` TrainGroups, the records in epoch_order, the
    negatives from a generator seeded by (seed, step).

    Random negatives come from the documents of the records that share the query's instruction, i.e. the same task:
    drawn from a mixed multi-task corpus, most of them would have another modality (an image for a query that asks
    for passages), which teaches only a modality shortcut that no evaluation candidate list rewards.
    """

    def __init__(self, records: list[TrainRecord], batch_size: int, num_negatives: int, hard_ratio: float = 0.5,
                 seed: int = 0):
        self.records, self.batch_size, self.seed = records, batch_size, seed
        by_instruction = {}
        for r in records:
            by_instruction.setdefault(r.instruction, []).append(r)
        self.samplers = {ins: NegativeSampler(rs, num_negatives, hard_ratio, seed)
                         for ins, rs in by_instruction.items()}

    def at(self, step: int) -> list[TrainGroup]:
        """The global batch of 0-based optimizer step `step`."""
        rng, groups = seeded(self.seed, "negatives", step), []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, i = divmod(k, len(self.records))
            record = self.records[epoch_order(self.seed, len(self.records), epoch)[i]]
            groups.append(TrainGroup(record, *self.samplers[record.instruction].sample(record, rng)))
        return groups
