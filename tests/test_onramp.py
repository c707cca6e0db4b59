"""The reranker on-ramp: hub ids resolved offline from the local cache (and clear errors when neither a folder nor
the cache has them), mixed-query pair scoring with a progress bar, rank(return_documents=True),
tools/rerank_run.py reranking a TREC run, and the optional integrations staying optional."""
import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import huggingface_hub
import numpy as np
import pytest
import torch
from hf_reference import save_tiny_hf
from oracles import make_tiny_tokenizer_dir, write_preprocessor_config
from PIL import Image

from minigmr.hub import resolve
from minigmr.metrics import rank, read_run
from minigmr.scoring import Reranker

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from rerank_run import main as rerank_main  # noqa: E402
from rerank_run import rerank  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    save_tiny_hf(path, seed=7)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path, 28 * 28 * 4, 28 * 28 * 40)
    return path


@pytest.fixture(scope="module")
def rr(ckpt):
    return Reranker.from_pretrained(ckpt, batch_size=3)


def img(seed, w=56, h=56):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- hub ids
@pytest.fixture
def hub_cache(tmp_path, monkeypatch, ckpt):
    """A Hugging Face cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/), offline."""
    repo = tmp_path / "hub" / "models--vec-ai--tiny-reranker"
    shutil.copytree(ckpt, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(repo / "snapshots" / COMMIT)


def test_hub_id_from_the_local_cache_offline(hub_cache, ckpt, rr):
    assert resolve("vec-ai/tiny-reranker") == hub_cache
    assert resolve(ckpt) == ckpt and resolve(None) is None  # a folder: no hub involved
    from_hub = Reranker.from_pretrained("vec-ai/tiny-reranker")
    torch.testing.assert_close(from_hub.logits("red?", ["a", "b"]), rr.logits("red?", ["a", "b"]), atol=0, rtol=0)


def test_hub_errors(hub_cache, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"vec-ai/absent: not a local folder, not in the Hugging Face cache "
                                                r".*HF_HUB_OFFLINE is set.*hf download vec-ai/absent"):
        resolve("vec-ai/absent")
    with pytest.raises(FileNotFoundError, match=r"no such folder \(nor a hub id"):
        resolve(str(tmp_path / "nowhere" / "ckpt"))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match=r"file.json: a file; give a checkpoint folder"):
        resolve(str(tmp_path / "file.json"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match=r"pip install 'minigmr\[hub\]'"):
        resolve("vec-ai/tiny-reranker")


# ---------------------------------------------------------------------------------------------------- pairs, rank
def test_score_pairs_mixed_queries(rr, capsys):
    picture = img(1)
    pairs = [("red?", "a red ball"), ({"image": picture}, "a caption"), ("red?", {"image": img(2)}),
             ({"image": picture}, "red"), ("blue?", "a red ball"), ("red?", "x")]
    got = rr.score_pairs(pairs, instruction="Find it.", show_progress_bar=True)
    assert "reranking" in capsys.readouterr().err  # the bar, on stderr
    want = {}
    for q, docs in (("red?", [pairs[0][1], pairs[2][1], pairs[5][1]]), ("blue?", [pairs[4][1]])):
        want[q] = rr.score(q, docs, "Find it.")
    pic = rr.score({"image": picture}, [pairs[1][1], pairs[3][1]], "Find it.")
    np.testing.assert_allclose(got, [want["red?"][0], pic[0], want["red?"][1], pic[1], want["blue?"][0],
                                     want["red?"][2]], atol=1e-6, rtol=0)
    rr.score_pairs(pairs[:1], show_progress_bar=False)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"pair 1: expected a \(query, document\) pair"):
        rr.score_pairs([("q", "d"), ("q",)])
    with pytest.raises(ValueError, match=r"pair 2: document: empty text and no image"):
        rr.score_pairs([("q", "d"), ("q", "e"), ("q", " ")])


def test_rank_return_documents(rr):
    docs = ["a red ball", {"image": img(3)}, "blue", "x y z"]
    plain = rr.rank("red?", docs, top_k=3)
    full = rr.rank("red?", docs, top_k=3, return_documents=True)
    assert [(i, s) for i, s, _ in full] == plain and [d for _, _, d in full] == [docs[i] for i, _ in plain]


# ---------------------------------------------------------------------------------------------------- rerank_run.py
def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rerank_a_trec_run(rr, ckpt, tmp_path):
    img(4).save(tmp_path / "d2.png")
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": "q1", "text": "red?"}, {"_id": "q2", "text": "blue?"},
                                             {"_id": "q3", "text": "not in the run"}])
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": "d1", "title": "Ball", "text": "a red ball", "metadata": {}},
                                            {"_id": "d2", "image": "d2.png"}, {"_id": "d3", "text": "blue sky"},
                                            {"_id": "d4", "text": "never a candidate"}])
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 3.0 bm25\nq1 Q0 d2 2 2.0 bm25\nq1 Q0 d3 3 1.0 bm25\n"
                                       "q2 Q0 d3 1 9.0 bm25\nq2 Q0 d1 2 8.0 bm25\n")
    got = rerank(rr, str(tmp_path / "queries.jsonl"), str(tmp_path / "corpus.jsonl"), str(tmp_path / "run.trec"),
                 str(tmp_path / "out.trec"), "Find it.", top_k=2, show_progress_bar=False)
    assert read_run(tmp_path / "out.trec") == got
    docs = {"d1": "Ball a red ball", "d2": {"image": str(tmp_path / "d2.png")}, "d3": "blue sky"}
    for q, text, first in (("q1", "red?", ["d1", "d2"]), ("q2", "blue?", ["d3", "d1"])):
        assert sorted(got[q]) == sorted(first)  # the first stage's top 2 only
        want = rr.score(text, [docs[d] for d in first], "Find it.")
        np.testing.assert_allclose([got[q][d] for d in first], want, atol=1e-6, rtol=0)
    lines = (tmp_path / "out.trec").read_text().splitlines()
    assert [ln.split()[2] for ln in lines if ln.startswith("q1")] == rank(got["q1"])  # written in reranked order
    # the command line, suite-format files and a missing candidate
    rerank_main([str(tmp_path / "queries.jsonl"), str(tmp_path / "corpus.jsonl"), str(tmp_path / "run.trec"),
                 str(tmp_path / "cli.trec"), "--model", ckpt, "--instruction", "Find it.", "--top-k", "2"])
    assert read_run(tmp_path / "cli.trec").keys() == got.keys()
    (tmp_path / "run.trec").write_text("q1 Q0 d1 1 3.0 bm25\nq2 Q0 d9 1 2.0 bm25\n")
    with pytest.raises(ValueError, match=r"run.trec:2: query 'q2': candidate 'd9' is not in .*corpus.jsonl"):
        rerank(rr, str(tmp_path / "queries.jsonl"), str(tmp_path / "corpus.jsonl"), str(tmp_path / "run.trec"),
               str(tmp_path / "bad.trec"))
    assert not os.path.exists(tmp_path / "bad.trec") and not os.path.exists(tmp_path / "bad.trec.partial")


# ---------------------------------------------------------------------------------------------------- optional extras
OPTIONAL = {"huggingface_hub": "hub.py", "mteb": "mteb_adapter.py", "sentence_transformers": None, "pyarrow": None,
            "datasets": None}  # package -> the one minigmr file allowed to import it (inside a function)


def test_optional_packages_stay_optional():
    root = pathlib.Path(__file__).resolve().parents[1]
    for f in (root / "minigmr").glob("*.py"):
        tree = ast.parse(f.read_text())
        in_functions = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for n in ast.walk(fn)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for package in {n.split(".")[0] for n in names} & set(OPTIONAL):
                assert OPTIONAL[package] == f.name, f"{f.name}:{node.lineno} imports the optional {package}"
                assert id(node) in in_functions, f"{f.name}:{node.lineno} imports {package} at module level"
    probe = ("import sys, minigmr, minigmr.hub, minigmr.pairs, minigmr.st_export, minigmr.mteb_adapter; "
             f"print(sorted(m for m in {sorted(OPTIONAL) + ['transformers']} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "[]"  # importing minigmr loads none of them
