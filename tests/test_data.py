"""Tests for minigmr/data.py, the evaluation-dataset folder format (round trip, suites, every validation error with
its file/line/id, skip mode), and minigmr/train_data.py: the training JSONL format, the negative sampler, and the
global batch of a step."""

import json
from collections import Counter

import pytest
import torch
from PIL import Image

from minigmr.data import TASK_GROUP, TASK_TYPES, Dataset, Item, load_dataset, load_suite, write_dataset
from minigmr.train_data import GlobalBatches, NegativeSampler, TrainRecord, load_training_data


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (255, 0, 0)).save(path)


def _write(tmp_path, name="toy", task="T->IT", folder=None, **overrides):
    """A small valid dataset with text-only, image-only and text+image items."""
    root = tmp_path / (folder or name)
    _png(root / "images" / "q2.png")
    _png(root / "images" / "d1.png")
    _png(root / "images" / "d2.png")
    args = dict(
        name=name, task=task, instruction="Find the document.", main_metric="ndcg@10", source="unit test",
        queries=[Item("q1", "a red square"), Item("q2", None, "images/q2.png"), Item("q3", "nothing here")],
        corpus=[Item("d1", "red", "images/d1.png"), Item("d2", None, str(root / "images" / "d2.png")),
                Item("d3", "blue"), Item("d10", "green")],
        qrels={"q1": {"d1": 2, "d3": 0, "elsewhere": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}},
        run={"q1": {"d1": 0.5, "d2": 0.5, "d10": 0.5, "d3": 0.1}, "q2": {"d2": 1.25, "d1": -3.0}})
    args.update(overrides)
    return root, write_dataset(root, **args)


def test_dataset_round_trip(tmp_path):
    root, ds = _write(tmp_path)
    assert isinstance(ds, Dataset)
    assert (ds.name, ds.task, ds.group, ds.instruction, ds.main_metric, ds.source, ds.root, ds.skipped) == (
        "toy", "T->IT", "fused-modal", "Find the document.", "ndcg@10", "unit test", str(root), [])
    assert ds.queries == {"q1": Item("q1", "a red square"), "q2": Item("q2", None, str(root / "images/q2.png")),
                          "q3": Item("q3", "nothing here")}
    assert ds.corpus["d1"] == Item("d1", "red", str(root / "images/d1.png"))
    assert ds.corpus["d2"] == Item("d2", None, str(root / "images/d2.png"))  # absolute in, relative on disk
    assert json.loads((root / "corpus.jsonl").read_text().splitlines()[1]) == {"id": "d2", "image": "images/d2.png"}
    assert ds.qrels == {"q1": {"d1": 2, "d3": 0, "elsewhere": 1}, "q2": {"d2": 1}, "q3": {"d3": 0}}
    assert ds.run == {"q1": {"d1": 0.5, "d2": 0.5, "d10": 0.5, "d3": 0.1}, "q2": {"d2": 1.25, "d1": -3.0}, "q3": {}}
    assert ds.candidates("q1") == ["d2", "d10", "d1", "d3"]  # trec_eval order: ties by doc id descending
    assert load_dataset(root) == ds


def test_task_groups_cover_all_types():
    assert set(TASK_GROUP) == set(TASK_TYPES) and len(TASK_TYPES) == 9
    assert [t for t in TASK_TYPES if TASK_GROUP[t] == "single-modal"] == ["T->T", "I->I"]
    assert [t for t in TASK_TYPES if TASK_GROUP[t] == "cross-modal"] == ["T->I", "T->VD", "I->T"]


def test_load_suite_sorted_by_name(tmp_path):
    _write(tmp_path / "suite", name="zeta", task="T->T", folder="a_folder")
    _write(tmp_path / "suite", name="alpha", task="I->T", folder="b_folder")
    (tmp_path / "suite" / "README.md").write_text("files and hidden folders are not datasets")
    (tmp_path / "suite" / ".cache").mkdir()
    suite = load_suite(tmp_path / "suite")
    assert [(d.name, d.group) for d in suite] == [("alpha", "cross-modal"), ("zeta", "single-modal")]
    (tmp_path / "suite" / "notes").mkdir()
    with pytest.raises(ValueError, match=r"notes/meta.json: not found"):
        load_suite(tmp_path / "suite")


def test_load_suite_duplicate_names(tmp_path):
    _write(tmp_path / "suite", name="a")
    root, _ = _write(tmp_path / "suite", name="b")
    meta = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**meta, "name": "a"}))
    with pytest.raises(ValueError, match="two datasets are named 'a'"):
        load_suite(tmp_path / "suite")


def _edit(path, lineno, new_line):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new_line
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("file,lineno,line,match", [
    ("corpus.jsonl", 2, '{"id": "d2", "text": "oops"', r"corpus.jsonl:2: malformed JSON"),
    ("corpus.jsonl", 3, '["d3", "blue"]', r"corpus.jsonl:3: expected a JSON object, got list"),
    ("queries.jsonl", 2, '{"text": "no id"}', r"queries.jsonl:2: missing or empty 'id'"),
    ("queries.jsonl", 3, '{"id": 3, "text": "int id"}', r"queries.jsonl:3: missing or empty 'id'.*got 3"),
    ("corpus.jsonl", 4, '{"id": "d1", "text": "again"}', r"corpus.jsonl:4: id 'd1': duplicate id"),
    ("corpus.jsonl", 3, '{"id": "d3", "text": ""}', r"corpus.jsonl:3: id 'd3': item has neither text nor image"),
    ("queries.jsonl", 1, '{"id": "q1", "txt": "typo"}', r"queries.jsonl:1: id 'q1': unknown field\(s\) \['txt'\]"),
    ("queries.jsonl", 1, '{"id": "q1", "text": 5}', r"queries.jsonl:1: id 'q1': 'text' must be a string"),
    ("qrels.tsv", 2, "q9 0 d1 1", r"qrels.tsv:2: query 'q9' is not in queries.jsonl"),
    ("run.trec", 3, "q7 Q0 d1 3 0.5 first_stage", r"run.trec:3: query 'q7' is not in queries.jsonl"),
    ("run.trec", 2, "q1 Q0 d1 2 0.5", r"run.trec:2: expected 6 fields"),
    ("qrels.tsv", 1, "q1 0 d1 high", r"qrels.tsv:1: relevance 'high' is not an integer"),
])
def test_dataset_errors_name_file_line_and_id(tmp_path, file, lineno, line, match):
    root, _ = _write(tmp_path)
    _edit(root / file, lineno, line)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(root)
    assert str(root / file) in str(info.value)  # the full path, not just the file name


@pytest.mark.parametrize("meta,match", [
    ({"task": "T->X"}, r"unknown task type 'T->X'; expected one of T->T, I->I"),
    ({"main_metric": "ndcg"}, r"main_metric: unknown metric 'ndcg'"),
    ({"name": None}, r"'name' must be a string"),
    ({"extra": "x"}, r"unknown field\(s\) \['extra'\]"),
])
def test_meta_errors(tmp_path, meta, match):
    root, _ = _write(tmp_path)
    base = json.loads((root / "meta.json").read_text())
    (root / "meta.json").write_text(json.dumps({**base, **meta}))
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(root)
    assert str(root / "meta.json") in str(info.value)


def test_meta_missing_field_and_file(tmp_path):
    root, _ = _write(tmp_path)
    (root / "meta.json").write_text(json.dumps({"name": "toy", "task": "T->T"}))
    with pytest.raises(ValueError, match=r"meta.json: missing field\(s\) \['instruction', 'main_metric'\]"):
        load_dataset(root)
    (root / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta.json: not found"):
        load_dataset(root)
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        load_dataset(root, on_error="ignore")


def test_run_candidate_absent_from_corpus_raise_or_skip(tmp_path):
    root, _ = _write(tmp_path)
    with open(root / "run.trec", "a") as f:
        f.write("q2 Q0 ghost 3 0.0 first_stage\nq1 Q0 phantom 5 0.0 first_stage\n")
    run_lines = (root / "run.trec").read_text().splitlines()
    with pytest.raises(ValueError, match=r"dataset 'toy': .*run.trec:7: query 'q2': candidate 'ghost' dropped: "
                                         r"it is not in corpus.jsonl"):
        load_dataset(root)
    assert run_lines[6].startswith("q2 Q0 ghost")
    ds = load_dataset(root, on_error="skip")
    assert len(ds.skipped) == 2 and "'phantom'" in ds.skipped[1] and "run.trec:8" in ds.skipped[1]
    assert ds.run["q2"] == {"d2": 1.25, "d1": -3.0} and "phantom" not in ds.run["q1"]


def test_missing_image_raise_or_skip(tmp_path):
    root, _ = _write(tmp_path)
    (root / "images" / "d1.png").unlink()
    (root / "images" / "q2.png").unlink()
    with pytest.raises(ValueError, match=r"dataset 'toy': .*queries.jsonl:2: id 'q2': image not found: .*q2.png"):
        load_dataset(root)
    assert load_dataset(root, check_images=False).queries["q2"].image == str(root / "images/q2.png")
    ds = load_dataset(root, on_error="skip")
    # dropped: query q2 (with its qrels and candidates), doc d1, and q1's candidate d1 (q2's went with q2)
    assert len(ds.skipped) == 3
    assert "q2" not in ds.queries and "q2" not in ds.qrels and "q2" not in ds.run and "d1" not in ds.corpus
    assert ds.run["q1"] == {"d2": 0.5, "d10": 0.5, "d3": 0.1}
    assert "candidate 'd1' dropped: its image is missing" in ds.skipped[2]
    assert ds.qrels["q1"]["d1"] == 2  # still relevant: the first stage lost it, recall must show that
    with open(root / "corpus.jsonl", "a") as f:
        f.write('{"id": "d1", "text": "d1 again, after the dropped d1"}\n')
    with pytest.raises(ValueError, match=r"corpus.jsonl:5: id 'd1': duplicate id"):
        load_dataset(root, on_error="skip")


@pytest.mark.parametrize("file,lineno", [("queries.jsonl", 2), ("corpus.jsonl", 4), ("qrels.tsv", 3),
                                          ("run.trec", 5), ("meta.json", 2)])
def test_non_utf8_byte_names_file_line_and_column(tmp_path, file, lineno):
    root, _ = _write(tmp_path)
    lines = (root / file).read_bytes().split(b"\n")
    lines[lineno - 1] = lines[lineno - 1][:3] + b"\xff" + lines[lineno - 1][3:]  # a Latin-1 byte, say
    (root / file).write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=rf"{file}:{lineno}: not valid UTF-8 \(byte 0xff at column 4\)") as info:
        load_dataset(root)
    assert str(root / file) in str(info.value)


def test_utf8_bom_is_accepted(tmp_path):
    root, ds = _write(tmp_path)
    for file in ("meta.json", "queries.jsonl", "corpus.jsonl", "qrels.tsv", "run.trec"):  # as Notepad saves them
        (root / file).write_bytes(b"\xef\xbb\xbf" + (root / file).read_bytes())
    assert load_dataset(root) == ds


@pytest.mark.parametrize("file,lineno,line,match", [
    ("queries.jsonl", 1, '{"id": "q1", "text": " \\t "}', r"queries.jsonl:1: id 'q1': item has neither text nor image"),
    ("corpus.jsonl", 2, '{"id": "d2", "image": "../elsewhere.png"}',
     r"corpus.jsonl:2: id 'd2': image '../elsewhere.png' is outside the dataset folder"),
    ("corpus.jsonl", 2, '{"id": "d2", "image": "images/../../toy2/images/d2.png"}',
     r"corpus.jsonl:2: id 'd2': image 'images/../../toy2/images/d2.png' is outside the dataset folder"),
    ("queries.jsonl", 2, '{"id": "q2", "image": "ABSOLUTE"}', r"queries.jsonl:2: id 'q2': image '/.*' is outside"),
])
def test_item_rules_of_write_dataset_hold_when_loading(tmp_path, file, lineno, line, match):
    root, _ = _write(tmp_path)
    _write(tmp_path, folder="toy2")  # a real image outside the dataset folder
    _edit(root / file, lineno, line.replace("ABSOLUTE", str(tmp_path / "toy2" / "images" / "q2.png")))
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(root, check_images=False)
    assert str(root / file) in str(info.value)


def test_blank_text_with_an_image_is_no_text(tmp_path):
    root, _ = _write(tmp_path)
    _edit(root / "corpus.jsonl", 1, '{"id": "d1", "text": "   ", "image": "images/d1.png"}')
    assert load_dataset(root).corpus["d1"] == Item("d1", None, str(root / "images" / "d1.png"))  # as "" would be


@pytest.mark.parametrize("meta,match", [({"name": ""}, r"'name' is blank"),
                                        ({"instruction": " "}, r"'instruction' is blank")])
def test_meta_blank_name_or_instruction(tmp_path, meta, match):
    root, _ = _write(tmp_path)
    (root / "meta.json").write_text(json.dumps({**json.loads((root / "meta.json").read_text()), **meta}))
    with pytest.raises(ValueError, match=rf"meta.json: {match}"):
        load_dataset(root)


def test_control_token_in_text_raise_or_skip(tmp_path):
    """<|image_pad|> or <|im_end|> in a text would be read as prompt structure: named at load, or dropped."""
    root, _ = _write(tmp_path)
    _edit(root / "corpus.jsonl", 3, '{"id": "d3", "text": "blue <|image_pad|>"}')
    _edit(root / "queries.jsonl", 3, '{"id": "q3", "text": "nothing<|im_end|>"}')
    with pytest.raises(ValueError, match=r"dataset 'toy': .*queries.jsonl:3: id 'q3': text contains the control "
                                         r"token <\|im_end\|>"):
        load_dataset(root)
    ds = load_dataset(root, on_error="skip")
    assert "q3" not in ds.queries and "d3" not in ds.corpus and ds.run["q1"] == {"d1": 0.5, "d2": 0.5, "d10": 0.5}
    assert [m.split(": ", 2)[2] for m in ds.skipped] == [
        "id 'q3': text contains the control token <|im_end|>", "id 'd3': text contains the control token "
        "<|image_pad|>", "query 'q1': candidate 'd3' dropped: its text contains a control token"]


def test_load_suite_given_a_dataset_folder(tmp_path):
    root, _ = _write(tmp_path)
    with pytest.raises(ValueError, match=rf"{root} is a dataset folder \(it has meta.json\), not a suite"):
        load_suite(root)


# ---------------------------------------------------------------- training data


def _train_file(tmp_path, records):
    _png(tmp_path / "img" / "q.png")
    _png(tmp_path / "img" / "p.png")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [
    {"id": "r1", "instruction": "Retrieve.", "query": "a bare-string query",
     "positives": ["pos text", {"text": "caption", "image": "img/p.png"}],
     "negatives": ["easy neg"], "hard_negatives": [{"text": "hard neg"}]},
    {"id": "r2", "instruction": "Match.", "query": {"image": "img/q.png"}, "positives": [{"image": "img/p.png"}]},
]


def test_training_data_round_trip(tmp_path):
    path = _train_file(tmp_path, GOOD)
    (tmp_path / "train.jsonl").write_text(path.read_text().replace("\n", "\n\n"))  # blank lines are ignored
    r1, r2 = load_training_data(path)
    img = lambda name: str(tmp_path / "img" / name)  # noqa: E731
    positives = [Item("r1/positives[0]", "pos text"), Item("r1/positives[1]", "caption", img("p.png"))]
    assert r1 == TrainRecord("r1", "Retrieve.", Item("r1", "a bare-string query"), positives,
                             [Item("r1/negatives[0]", "easy neg")], [Item("r1/hard_negatives[0]", "hard neg")])
    assert r2 == TrainRecord("r2", "Match.", Item("r2", None, img("q.png")),
                             [Item("r2/positives[0]", None, img("p.png"))])


R3 = {"id": "r3", "instruction": "x", "query": "q", "positives": ["p"]}  # a valid third record


@pytest.mark.parametrize("line,match", [
    ('{"id": "r3", "instruction": "x"', r"train.jsonl:3: malformed JSON"),
    ({**R3, "id": None}, r"train.jsonl:3: missing or empty 'id'"),
    ({**R3, "id": "r1"}, r"train.jsonl:3: id 'r1': duplicate id"),
    ({**R3, "instruction": None}, r"train.jsonl:3: id 'r3': 'instruction' must be a string"),
    ({**R3, "instruction": ...}, r"train.jsonl:3: id 'r3': missing field\(s\) \['instruction'\]"),
    ({**R3, "positives": ...}, r"train.jsonl:3: id 'r3': missing field\(s\) \['positives'\]"),
    ({**R3, "pos_scores": [1]}, r"train.jsonl:3: id 'r3': .*unknown field\(s\) \['pos_scores'\]"),
    ({**R3, "positives": []}, r"train.jsonl:3: id 'r3': 'positives' is empty"),
    ({**R3, "positives": "p"}, r"train.jsonl:3: id 'r3': 'positives' must be a list"),
    ({**R3, "query": {}}, r"train.jsonl:3: id 'r3': query: item has neither text nor image"),
    ({**R3, "query": 7}, r"train.jsonl:3: id 'r3': query: expected a string"),
    ({**R3, "query": "  "}, r"train.jsonl:3: id 'r3': query: item has neither text nor image"),
    ('{"id": "r3", "query": "caf\xe9"}', r"train.jsonl:3: not valid UTF-8 \(byte 0xe9 at column 27\)"),
    ({**R3, "positives": ["p", {"text": None}]},
     r"train.jsonl:3: id 'r3': positives\[1\]: item has neither text nor image"),
    ({**R3, "hard_negatives": [{"image": "img/none.png"}]},
     r"train.jsonl:3: id 'r3': hard_negatives\[0\]: image not found: .*img/none.png"),
    ({**R3, "negatives": ["n", "p"]},
     r"train.jsonl:3: id 'r3': negatives\[1\]: this doc is also one of the record's positives"),
])
def test_training_data_errors(tmp_path, line, match):
    path = _train_file(tmp_path, GOOD)
    with open(path, "a", encoding="latin-1") as f:  # = UTF-8 for the ASCII that json.dumps writes
        record = {k: v for k, v in line.items() if v is not ...} if isinstance(line, dict) else line  # ... = drop
        f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    with pytest.raises(ValueError, match=match) as info:
        load_training_data(path)
    assert str(path) in str(info.value)


def test_training_missing_image_can_be_unchecked(tmp_path):
    path = _train_file(tmp_path, GOOD)
    (tmp_path / "img" / "q.png").unlink()
    with pytest.raises(ValueError, match=r"train.jsonl:2: id 'r2': query: image not found"):
        load_training_data(path)
    assert load_training_data(path, check_images=False)[1].query.image == str(tmp_path / "img" / "q.png")


# ---------------------------------------------------------------- negative sampler


def _records(n_records=30, n_hard=10, n_neg=10):
    doc = lambda t: Item(t, t)  # noqa: E731
    return [TrainRecord(f"r{i}", "ins", Item(f"r{i}", f"query {i}"), [doc(f"pos {i}.0"), doc(f"pos {i}.1")],
                        [doc(f"neg {i}.{j}") for j in range(n_neg)], [doc(f"hard {i}.{j}") for j in range(n_hard)])
            for i in range(n_records)]


def test_sampler_ratio_and_sources():
    records = _records()
    for n, ratio, n_hard in [(16, 0.5, 8), (8, 0.25, 2), (5, 0.5, 3), (4, 0.0, 0), (4, 1.0, 4)]:
        sampler = NegativeSampler(records, n, hard_ratio=ratio)
        rng, covered = torch.Generator().manual_seed(1), set()
        for record in records[:5] * 10:
            positive, negatives = sampler.sample(record, rng)
            hard_texts = {d.text for d in record.hard_negatives}
            assert positive in record.positives and len(negatives) == n
            assert all(d.text in hard_texts for d in negatives[:n_hard])  # the hard slots
            assert len({d.text for d in negatives[:n_hard]}) == n_hard  # no repeats while the pool suffices
            covered.update(d.text for d in negatives[:n_hard])
            # the random slots come from the whole corpus: over 5 records nearly none is this record's
            assert sum(d.text.startswith(("hard", "neg")) and d.text.split()[1].split(".")[0] == record.id[1:]
                       for d in negatives[n_hard:]) <= 2
        if n_hard == 8:
            assert len(covered) == 50  # drawn at random: every hard negative of the 5 records shows up


def test_sampler_fallbacks_when_pools_are_small():
    doc = lambda t: Item(t, t)  # noqa: E731
    few_hard = TrainRecord("a", "ins", Item("a", "q"), [doc("p")], [doc(f"n{j}") for j in range(5)], [doc("h0")])
    tiny = TrainRecord("b", "ins", Item("b", "q"), [doc("p2")], [], [doc("h1"), doc("h2")])
    bare = TrainRecord("c", "ins", Item("c", "q"), [doc("p3")])
    sampler = NegativeSampler([few_hard, tiny, bare], 8)
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):  # 4 hard slots: the 1 hard negative, then 3 distinct of the record's negatives
        _, negs = sampler.sample(few_hard, rng)
        assert negs[0].text == "h0" and len({d.text for d in negs[1:4]} & {f"n{j}" for j in range(5)}) == 3
    _, negs = sampler.sample(tiny, rng)
    assert Counter(d.text for d in negs[:4]) == {"h1": 2, "h2": 2}  # pool of 2 reused, evenly
    _, negs = sampler.sample(bare, rng)
    assert len(negs) == 8 and all(d.text != "p3" for d in negs)  # no hard pool: all 8 random
    # corpus minus positives has 10 docs < 12 wanted: with replacement, still never the positive
    _, negs = NegativeSampler([few_hard, tiny, bare], 24, hard_ratio=0.5).sample(bare, rng)
    assert len(negs) == 24 and "p3" not in {d.text for d in negs} and len({d.text for d in negs}) == 10


def test_sampler_never_returns_a_positive():
    doc = lambda t, img=None: Item(t, t, img)  # noqa: E731
    # 2 records, corpus of 6 docs; r0's positives are 2 of them, and "shared" also appears as r1's negative
    r0 = TrainRecord("r0", "ins", Item("r0", "q"), [doc("shared"), doc("p0")], [], [])
    r1 = TrainRecord("r1", "ins", Item("r1", "q"), [doc("p1")], [Item("other-id", "shared"), doc("n1")],
                     [doc("h1")])
    sampler = NegativeSampler([r0, r1], 3, hard_ratio=0.0)
    assert len(sampler.corpus) == 5  # "shared" counted once whatever its ids
    seen, positives = Counter(), Counter()
    rng = torch.Generator().manual_seed(0)
    for _ in range(300):
        positive, negs = sampler.sample(r0, rng)
        positives[positive.text] += 1
        assert positive.text in {"shared", "p0"} and len(set(d.text for d in negs)) == 3
        seen.update(d.text for d in negs)
    assert set(seen) == {"p1", "n1", "h1"}  # every eligible doc, never a positive
    assert min(positives.values()) > 100  # both positives get drawn
    with pytest.raises(ValueError, match="record 'solo': the corpus has no document besides its positives"):
        solo = TrainRecord("solo", "ins", Item("solo", "q"), [doc("x")])
        NegativeSampler([solo], 2).sample(solo)


def test_sampler_is_deterministic():
    records = _records()
    sampler = NegativeSampler(records, 8)

    def draw(rng):
        return [(p.id, [d.id for d in n]) for p, n in (sampler.sample(r, rng) for r in records)]

    a = draw(torch.Generator().manual_seed(3))
    assert a == draw(torch.Generator().manual_seed(3)) and a != draw(torch.Generator().manual_seed(4))
    seeded = lambda: NegativeSampler(records, 8, seed=5)  # noqa: E731
    s1, s2 = seeded(), seeded()
    assert [s1.sample(r)[1] for r in records] == [s2.sample(r)[1] for r in records]  # rng=None: the seed
    with pytest.raises(ValueError, match="hard_ratio"):
        NegativeSampler(records, 4, hard_ratio=1.5)


# ---------------------------------------------------------------- global batches


def test_global_batch_is_a_pure_function_of_seed_and_step():
    other = TrainRecord("other", "other task", Item("other", "q"), [Item("o", "o")], [], [Item("oh", "oh")])
    records = _records(n_records=10) + [other]
    global_batches = lambda seed=0: GlobalBatches(records, batch_size=4, num_negatives=3, seed=seed)  # noqa: E731
    ids = lambda batch: [(g.record.id, g.positive.id, [d.id for d in g.negatives]) for g in batch]  # noqa: E731
    a, b = global_batches(), global_batches()
    steps = [ids(a.at(k)) for k in range(6)]
    assert [ids(b.at(k)) for k in reversed(range(6))] == steps[::-1]  # any order, any instance: the same batch
    assert steps[0] != ids(global_batches(seed=1).at(0))
    # 11 records, 4 per step: steps 0-1 and the first 3 groups of step 2 are epoch 0, each record exactly once
    epoch0 = [g[0] for step in steps[:2] for g in step] + [g[0] for g in steps[2][:3]]
    assert sorted(epoch0) == sorted(r.id for r in records)
    for g in a.at(0) + a.at(1) + a.at(2):  # random negatives only from the same instruction's records
        assert len(g.negatives) == 3 and all((d.id == "oh") == (g.record is other) for d in g.negatives)

