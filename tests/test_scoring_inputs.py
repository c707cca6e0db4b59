"""The Reranker's public boundary: every bad argument or document is an error that says which one and what was
expected; documented defaults (instruction=None) mean what they say; nothing is a Python-slicing accident."""
import numpy as np
import pytest
from PIL import Image

from hf_reference import save_tiny_hf
from minigmr.prompt import DEFAULT_INSTRUCTION
from minigmr.scoring import Reranker
from oracles import make_tiny_tokenizer_dir, write_preprocessor_config

DOCS = ["a red circle", "two blue squares", "one green star"]


@pytest.fixture(scope="module")
def rr(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny_hf(path, seed=1, vision_depth=2, fullatt=(1,), text_layers=2)
    make_tiny_tokenizer_dir(path)
    write_preprocessor_config(path, 3136, 50176)
    return Reranker.from_pretrained(str(path))


def test_instruction_none_means_the_default(rr):
    assert rr.score("circle", DOCS, instruction=None) == rr.score("circle", DOCS, instruction=DEFAULT_INSTRUCTION)
    assert rr.score("circle", DOCS) == rr.score("circle", DOCS, instruction=DEFAULT_INSTRUCTION)


@pytest.mark.parametrize("instruction", [42, ["a"], b"bytes"])
def test_instruction_must_be_text(rr, instruction):
    with pytest.raises(TypeError, match=r"instruction must be a str \(or None for the default\)"):
        rr.score("circle", DOCS, instruction=instruction)


def test_instruction_with_a_control_token(rr):
    with pytest.raises(ValueError, match=r"instruction: its text contains the special token '<\|im_end\|>'"):
        rr.score("circle", DOCS, instruction="judge<|im_end|>")


@pytest.mark.parametrize("max_length", [0, -1, "100", 2.5])
def test_max_length_is_checked_up_front(rr, max_length):
    with pytest.raises(ValueError, match=r"max_length must be None or a positive integer"):
        Reranker(rr.model, rr.processor, max_length=max_length)


def test_documents_must_be_a_sequence(rr):
    for bad in (set(DOCS), (d for d in DOCS), None):
        with pytest.raises(TypeError, match=r"documents must be a non-empty list of documents"):
            rr.score("circle", bad)


def test_top_k(rr):
    full, scores = rr.rank("circle", DOCS), rr.score("circle", DOCS)
    assert full == [(i, scores[i]) for i in sorted(range(3), key=lambda i: (-scores[i], i))]
    assert rr.rank("circle", DOCS, top_k=2) == full[:2]
    assert rr.rank("circle", DOCS, top_k=10) == full  # more than there are: all of them
    assert rr.rank("circle", DOCS, top_k=0) == []
    for bad in (-1, -3):
        with pytest.raises(ValueError, match=rf"top_k must be None or an integer >= 0, got {bad}"):
            rr.rank("circle", DOCS, top_k=bad)
    for bad in (1.5, "2", True):
        with pytest.raises(TypeError, match=r"top_k must be None or an integer >= 0"):
            rr.rank("circle", DOCS, top_k=bad)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "4", True])
def test_batch_size(rr, batch_size):
    with pytest.raises((TypeError, ValueError), match=r"batch_size must be (None or )?a positive integer"):
        rr.score("circle", DOCS, batch_size=batch_size)


def test_documents_must_be_a_list(rr):
    with pytest.raises(TypeError, match=r"documents must be a non-empty list of documents, got str"):
        rr.score("circle", "a single string is not a list of documents")
    with pytest.raises(ValueError, match=r"documents must be a non-empty list of documents, got an empty list"):
        rr.rank("circle", [])


@pytest.mark.parametrize("bad,message", [
    (None, r"document 2: a query/document must be a str, a path, a PIL image or a dict, not NoneType"),
    (42, r"document 2: a query/document must be a str, a path, a PIL image or a dict, not int"),
    ({}, r"document 2: .*needs 'text' and/or 'image'"),
    ({"text": 7}, r"document 2: 'text' must be a str"),
    ("look: <|image_pad|>", r"document 2: its text contains the special token '<\|image_pad\|>'"),
    ("end <|im_end|> here", r"document 2: its text contains the special token '<\|im_end\|>'"),
    ("", r"document 2: empty text and no image"),
    ({"text": "  "}, r"document 2: empty text and no image"),
])
def test_bad_document_names_its_index(rr, bad, message):
    docs = DOCS[:2] + [bad] + DOCS[2:]
    with pytest.raises((TypeError, ValueError), match=message):
        rr.score("circle", docs)


def test_bad_query_says_query(rr):
    with pytest.raises((TypeError, ValueError), match=r"query: .*not NoneType"):
        rr.score(None, DOCS)
    with pytest.raises(ValueError, match=r"query: its text contains the special token"):
        rr.score("<|vision_start|>", DOCS)


def test_extreme_aspect_ratio_names_document_and_file(rr, tmp_path):
    path = tmp_path / "strip.png"
    Image.fromarray(np.zeros((28, 28 * 201, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"document 1: .*strip.png.*aspect ratio"):
        rr.score("circle", [DOCS[0], {"image": str(path)}])
    with pytest.raises(ValueError, match=r"document 1: .*aspect ratio"):
        rr.score("circle", [DOCS[0], Image.open(path)])


def test_missing_image_names_document(rr, tmp_path):
    with pytest.raises(ValueError, match=r"document 0: .*nope.png"):
        rr.score("circle", [{"image": str(tmp_path / "nope.png")}])
