"""The mteb adapter: a small local any-to-any task, reranked end to end by mteb (both as a task with first-stage
candidates and through mteb's convert_to_reranking), gives exactly Reranker.score's scores with the task's prompt
as the instruction."""
import json
import os

import mteb
import numpy as np
import pytest
from datasets import Dataset
from hf_reference import save_tiny_hf
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from oracles import make_tiny_tokenizer_dir, write_preprocessor_config
from PIL import Image

from minigmr.mteb_adapter import MtebReranker, task_instruction
from minigmr.scoring import Reranker

PROMPT = "Find the document that answers the question about the picture."


def img(seed, w=56, h=84):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


QUERIES = {"q0": {"text": "which shape is red?", "image": img(1)}, "q1": {"text": "two circles", "image": img(2)},
           "q2": {"text": "a query without candidates", "image": img(3)}}
CORPUS = {"d0": {"text": "a red square", "image": None}, "d1": {"text": "", "image": img(4)},
          "d2": {"text": "caption", "image": img(5, 84, 56)}, "d3": {"text": "blue circles", "image": None}}
QRELS = {"q0": {"d0": 1, "d2": 0}, "q1": {"d3": 1, "d1": 1}, "q2": {"d0": 1}}
FIRST_STAGE = {"q0": {"d2": 3.0, "d0": 2.0, "d1": 1.0}, "q1": {"d1": 0.5, "d3": 0.4, "d0": 0.3, "d2": 0.2}}


class LocalTask(AbsTaskRetrieval):
    metadata = TaskMetadata(
        name="MinigmrLocalIT2IT", description="A tiny local image+text reranking task for minigmr's tests.",
        reference="https://github.com/embeddings-benchmark/mteb", dataset={"path": "NA", "revision": "NA"},
        type="Any2AnyRetrieval", category="it2it", modalities=["image", "text"], eval_splits=["test"],
        eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=("2026-01-01", "2026-01-01"), dialect=[],
        domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", sample_creation="found",
        bibtex_citation="", prompt={"query": PROMPT})

    def __init__(self, top_ranked=None, **kw):
        super().__init__(**kw)
        self.first_stage = top_ranked

    def load_data(self, num_proc=None, **kwargs):
        columns = lambda items: {"id": list(items), "text": [v["text"] for v in items.values()],
                                 "image": [v["image"] for v in items.values()]}
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_dict(columns(QUERIES)), corpus=Dataset.from_dict(columns(CORPUS)),
            relevant_docs=QRELS, top_ranked=self.first_stage)}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_hf(path, seed=5)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path, 28 * 28 * 4, 28 * 28 * 40)
    return str(path)


@pytest.fixture(scope="module")
def reranker(ckpt):
    return Reranker.from_pretrained(ckpt)


def expected(rr, ranked):
    item = lambda v: {k: x for k, x in v.items() if x}
    return {q: dict(zip(docs, rr.score(item(QUERIES[q]), [item(CORPUS[d]) for d in docs], PROMPT)))
            for q, docs in ranked.items()}


def predictions(folder):
    (file,) = list(folder.glob("*.json"))
    return json.loads(file.read_text())["default"]["test"]


def check(got, want):
    for q, docs in want.items():
        assert sorted(got[q]) == sorted(docs)
        np.testing.assert_allclose([got[q][d] for d in docs], list(docs.values()), atol=1e-6, rtol=0)


def test_mteb_reranks_a_local_task(reranker, tmp_path):
    ranked = {q: sorted(docs, key=docs.get, reverse=True) for q, docs in FIRST_STAGE.items()}
    result = mteb.evaluate(MtebReranker(reranker=reranker), LocalTask(top_ranked=ranked), cache=None,
                           prediction_folder=tmp_path, show_progress_bar=False)
    assert result.task_results[0].get_score() is not None
    check(predictions(tmp_path), expected(reranker, ranked))
    default = reranker.score(QUERIES["q0"]["text"], [CORPUS["d0"]["text"]])  # the prompt did reach the model
    assert default != expected(reranker, {"q0": ["d0"]})["q0"]["d0"]


def test_two_stage_flow_convert_to_reranking(reranker, tmp_path):
    """mteb's recipe: a first stage's saved predictions -> convert_to_reranking(top_k) -> minigmr."""
    first = tmp_path / "first"
    first.mkdir()
    (first / f"{LocalTask.metadata.name}_predictions.json").write_text(json.dumps(
        {"mteb_model_meta": {"model_name": "any/retriever", "revision": "1"}, "default": {"test": FIRST_STAGE}}))
    task = LocalTask().convert_to_reranking(first, top_k=2)
    mteb.evaluate(MtebReranker(reranker=reranker), task, cache=None, prediction_folder=tmp_path / "second",
                  show_progress_bar=False)
    top2 = {q: sorted(docs, key=docs.get, reverse=True)[:2] for q, docs in FIRST_STAGE.items()}
    check(predictions(tmp_path / "second"), expected(reranker, top2))


def test_loading_instruction_and_errors(ckpt, reranker):
    loaded = MtebReranker(ckpt, batch_size=2)  # as mteb's loader calls it: model name (a folder here), revision
    assert loaded.reranker.batch_size == 2 and loaded.mteb_model_meta.name.endswith(os.path.basename(ckpt))
    assert task_instruction(LocalTask.metadata) == PROMPT
    with pytest.raises(ValueError, match="exactly one of model_name"):
        MtebReranker()
    bad = MtebReranker.__new__(MtebReranker)
    with pytest.raises(ValueError, match="mteb document id 'd9': neither text nor image"):
        bad.predict([{"id": ["q0"], "text": ["x"]}], [{"id": ["d9"], "text": [" "], "image": [None]}],
                    task_metadata=LocalTask.metadata, hf_split="test", hf_subset="default")
