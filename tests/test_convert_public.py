"""tools/convert_public.py on small files written in exactly the public schemas (M-BEIR JSONL + qrels, UMRB and
ViDoRe parquet with Hugging Face Image structs): the suite loads, qrels and images survive byte for byte, only the
run's top-k candidates are kept, and malformed input is an error naming the file and the record."""
import io
import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from minigmr.data import load_dataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from convert_public import convert, main  # noqa: E402

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in parquet


def png(seed, w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_table(path, columns: dict, types: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({k: pa.array(v, type=types.get(k)) for k, v in columns.items()}), path)


def write_run(path, run: dict):
    with open(path, "w") as f:
        for q, docs in run.items():
            for r, (d, s) in enumerate(sorted(docs.items(), key=lambda x: -x[1]), 1):
                f.write(f"{q} Q0 {d} {r} {s} first\n")


def suite_kw(task):
    return dict(name="x", task=task, instruction="Find it.", main_metric="ndcg@10", top_k=2)


def image_bytes(ds, item_id, corpus=True):
    with open((ds.corpus if corpus else ds.queries)[item_id].image, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------- UMRB
def umrb(tmp_path):
    src = tmp_path / "UMRB-OKVQA"
    str_types = {"id": pa.string(), "text": pa.string(), "image": IMAGE}
    write_table(str(src / "corpus.parquet"), {"id": ["d0", "d1", "d2", "d3"],
                "text": ["a red ball", None, "a dog", "unrelated"],
                "image": [None, {"bytes": png(1), "path": "d1.png"}, {"bytes": png(2), "path": None}, None]}, str_types)
    write_table(str(src / "query.parquet"), {"id": ["q0", "q1"], "text": ["what colour?", "which animal?"],
                "image": [{"bytes": png(3), "path": None}, {"bytes": png(4), "path": None}]}, str_types)
    write_table(str(src / "qrels.parquet"), {"query-id": ["q0", "q1", "q1"], "corpus-id": ["d0", "d2", "d9"],
                "score": [1, 2, 1]}, {"score": pa.int64()})
    write_run(tmp_path / "run.trec", {"q0": {"d0": 3.0, "d1": 2.0, "d3": 1.0}, "q1": {"d2": 5.0, "d1": 4.0}})
    return src


def test_umrb(tmp_path):
    ds = convert("umrb", str(umrb(tmp_path)), str(tmp_path / "suite" / "okvqa"), str(tmp_path / "run.trec"),
                 **suite_kw("IT->T"))
    assert ds == load_dataset(tmp_path / "suite" / "okvqa")
    assert ds.qrels == {"q0": {"d0": 1}, "q1": {"d2": 2, "d9": 1}}  # d9: relevant, never retrieved: kept
    assert {q: sorted(d) for q, d in ds.run.items()} == {"q0": ["d0", "d1"], "q1": ["d1", "d2"]}  # top 2
    assert sorted(ds.corpus) == ["d0", "d1", "d2"]  # d3 is nobody's top-2 candidate
    assert image_bytes(ds, "d1") == png(1) and image_bytes(ds, "q1", corpus=False) == png(4)
    assert ds.corpus["d0"].text == "a red ball" and ds.corpus["d0"].image is None
    assert ds.queries["q0"].text == "what colour?" and ds.corpus["d2"].text == "a dog"


# ---------------------------------------------------------------------------------------------------- ViDoRe
def vidore(tmp_path):
    src = tmp_path / "docvqa_beir"
    write_table(str(src / "corpus" / "test-00000-of-00001.parquet"),
                {"corpus-id": [0, 1, 2], "image": [{"bytes": png(10 + i), "path": f"{i}.png"} for i in range(3)]},
                {"corpus-id": pa.int64(), "image": IMAGE})
    write_table(str(src / "queries" / "test-00000-of-00001.parquet"),
                {"query-id": [7, 8], "query": ["total revenue?", "who signed?"], "answer": ["5", "Bo"]},
                {"query-id": pa.int64()})
    write_table(str(src / "queries" / "train-00000-of-00001.parquet"), {"query-id": [99], "query": ["a train query"]},
                {"query-id": pa.int64()})  # another split's file: never read
    write_table(str(src / "qrels" / "test" / "0000.parquet"),  # the Hub's <config>/<split>/ layout
                {"query-id": [7, 8], "corpus-id": [2, 0], "score": [1, 1]},
                {"query-id": pa.int64(), "corpus-id": pa.int64(), "score": pa.int64()})
    return src


def test_vidore_and_beir_only(tmp_path):
    src = vidore(tmp_path)
    beir = convert("vidore", str(src), str(tmp_path / "beir"))
    assert sorted(os.listdir(beir)) == ["corpus.jsonl", "images", "qrels", "queries.jsonl"]
    write_run(tmp_path / "run.trec", {"7": {"0": 1.0, "1": 0.5, "2": 0.2}, "8": {"0": 0.9, "2": 0.1}})
    main(["vidore", str(src), str(tmp_path / "suite" / "docvqa"), "--run", str(tmp_path / "run.trec"),
          "--name", "docvqa", "--task", "T->VD", "--instruction", "Find the page.", "--top-k", "3"])
    ds = load_dataset(tmp_path / "suite" / "docvqa")
    assert ds.qrels == {"7": {"2": 1}, "8": {"0": 1}} and ds.task == "T->VD" and ds.name == "docvqa"
    assert [image_bytes(ds, d) for d in "012"] == [png(10), png(11), png(12)]
    assert ds.queries["7"].text == "total revenue?" and ds.queries["7"].image is None and "99" not in ds.queries
    (src / "queries" / "test-00000-of-00001.parquet").unlink()
    with pytest.raises(ValueError, match=r"no queries.parquet and no queries/test\*.parquet .*train-00000"):
        convert("vidore", str(src), str(tmp_path / "beir2"))


# ---------------------------------------------------------------------------------------------------- M-BEIR
def mbeir(tmp_path):
    root = tmp_path / "M-BEIR"
    (root / "mbeir_images" / "cirr").mkdir(parents=True)
    for i in range(3):
        (root / "mbeir_images" / "cirr" / f"{i}.png").write_bytes(png(20 + i))
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)
    (root / "query" / "test").mkdir(parents=True)
    (root / "query" / "test" / "mbeir_cirr_task7_test.jsonl").write_text(lines([
        {"qid": "7:1", "query_txt": "same but blue", "query_img_path": "mbeir_images/cirr/0.png",
         "query_modality": "image,text", "query_src_content": None, "pos_cand_list": ["7:11"], "neg_cand_list": [],
         "task_id": 7}]))
    (root / "cand_pool" / "local").mkdir(parents=True)
    (root / "cand_pool" / "local" / "mbeir_cirr_task7_cand_pool.jsonl").write_text(lines([
        {"txt": "", "img_path": "mbeir_images/cirr/1.png", "modality": "image", "did": "7:11", "src_content": None},
        {"txt": None, "img_path": "mbeir_images/cirr/2.png", "modality": "image", "did": "7:12"},
        {"txt": "a caption only", "img_path": None, "modality": "text", "did": "7:13"}]))
    (root / "qrels" / "test").mkdir(parents=True)
    (root / "qrels" / "test" / "mbeir_cirr_task7_test_qrels.txt").write_text("7:1 0 7:11 1 7\n")
    write_run(tmp_path / "run.trec", {"7:1": {"7:12": 0.9, "7:11": 0.8, "7:13": 0.1}})
    return root


def test_mbeir(tmp_path):
    ds = convert("mbeir", str(mbeir(tmp_path)), str(tmp_path / "suite" / "cirr"), str(tmp_path / "run.trec"),
                 mbeir_set="cirr_task7", **suite_kw("IT->I"))
    assert ds.qrels == {"7:1": {"7:11": 1}} and sorted(ds.corpus) == ["7:11", "7:12"]
    assert ds.queries["7:1"].text == "same but blue" and image_bytes(ds, "7:1", corpus=False) == png(20)
    assert image_bytes(ds, "7:11") == png(21) and ds.corpus["7:11"].text is None


# ---------------------------------------------------------------------------------------------------- errors
def edit_jsonl(path, line, **changes):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[line].update(changes)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("case", ["modality", "missing image", "bad json", "qrels columns", "parquet column",
                                  "empty item", "not an image", "duplicate id"])
def test_malformed_input_names_file_and_record(tmp_path, case):
    run = str(tmp_path / "run.trec")
    if case in ("modality", "missing image", "bad json", "qrels columns"):
        root = mbeir(tmp_path)
        pool = root / "cand_pool" / "local" / "mbeir_cirr_task7_cand_pool.jsonl"
        if case == "modality":
            edit_jsonl(pool, 1, modality="text")
            want = r"mbeir_cirr_task7_cand_pool.jsonl:2: did '7:12': modality 'text' but"
        elif case == "missing image":
            edit_jsonl(pool, 0, img_path="mbeir_images/cirr/nope.png")
            want = r"cand_pool.jsonl:1: did '7:11': image not found under .*'mbeir_images/cirr/nope.png'"
        elif case == "bad json":
            pool.write_text(pool.read_text() + "{not json\n")
            want = r"cand_pool.jsonl:4: malformed JSON"
        else:
            (root / "qrels" / "test" / "mbeir_cirr_task7_test_qrels.txt").write_text("7:1 0 7:11 1\n")
            want = r"test_qrels.txt:1: expected 5 columns"
        args = ("mbeir", str(root), str(tmp_path / "out"), run)
        kw = dict(mbeir_set="cirr_task7", **suite_kw("IT->I"))
    else:
        src = umrb(tmp_path)
        types = {"id": pa.string(), "text": pa.string(), "image": IMAGE}
        corpus = {"id": ["d0", "d1", "d2"], "text": ["a", "b", "c"], "image": [None, None, None]}
        if case == "parquet column":
            corpus = {"doc_id": corpus["id"], "text": corpus["text"]}
            want = r"corpus.parquet: missing column\(s\) \['id'\]"
        elif case == "empty item":
            corpus["text"][1] = " "
            want = r"corpus.parquet: row 1: id 'd1' has neither text nor image"
        elif case == "not an image":
            corpus["image"][2] = {"bytes": b"GIF89a-truncated", "path": None}
            want = r"corpus.parquet: row 2: id 'd2': not a readable image"
        else:
            corpus["id"][2] = "d1"
            want = r"corpus.parquet: row 2: duplicate id 'd1'"
        write_table(str(src / "corpus.parquet"), corpus, types)
        args, kw = ("umrb", str(src), str(tmp_path / "out"), run), suite_kw("IT->T")
    with pytest.raises(ValueError, match=want):
        convert(*args, **kw)
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".out", "out"))]  # nothing left behind
