"""The embedder equals the plain full-prompt forward, whatever the batch size, padding side, order and mix of
instructions; retrieval's top-k equals a brute-force sort in trec_eval's order, ties included."""
import pytest
import torch
from test_scoring import cases, ckpt, model_proc  # noqa: F401 (pytest fixtures)

from minigmr.data import Dataset, Item
from minigmr.embedding import Embedder, embed_messages, item_states, normalized, search
from minigmr.eval_cache import corpus_embeddings
from minigmr.metrics import rank
from minigmr.prompt import as_item

INSTRUCTION = "Find the document that answers the question."


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    queries, docs = cases(tmp_path_factory)
    return queries + docs


def plain(model, proc, items, instruction=None):
    """Each item's whole prompt alone through the model, the final state at its last position, normalised."""
    out = []
    for x in items:
        batch = proc.apply_chat([embed_messages(as_item(x), instruction)])
        h, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                   batch["image_grid_thw"])
        out.append(h[0, -1])
    return normalized(torch.stack(out))


def test_prompt_reads_as_e5v(model_proc):
    _, proc = model_proc
    text = proc.render(embed_messages(as_item({"image": "a.png", "text": "two red circles"}), INSTRUCTION))
    assert text.endswith("<|vision_end|>two red circles\nSummarize above image and sentence in one word:"
                         "<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith(f"<|im_start|>system\n{INSTRUCTION}<|im_end|>\n<|im_start|>user\n")
    assert "You are a helpful assistant." in proc.render(embed_messages(as_item("x")))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_batch_equals_one_at_a_time_and_plain(model_proc, items, padding_side, batch_size):
    model, proc = model_proc
    emb = Embedder(model, proc, batch_size=batch_size, padding_side=padding_side)
    together = emb.embed(items)
    alone = torch.cat([emb.embed([x]) for x in items])
    assert together.dtype == torch.float32 and together.shape == (len(items), model.config.text.hidden_size)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(len(items)), atol=1e-6, rtol=0)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(together, plain(model, proc, items), atol=1e-5, rtol=0)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(batch_size)).tolist()
    torch.testing.assert_close(emb.embed([items[i] for i in perm]), together[perm], atol=1e-5, rtol=0)


def test_instructions_mixed_in_one_call(model_proc, items):
    """Training embeds queries (with their instruction) and documents (none) in one call: the same vectors."""
    model, proc = model_proc
    emb = Embedder(model, proc)
    with_ins = emb.embed(items, INSTRUCTION)
    torch.testing.assert_close(with_ins, plain(model, proc, items, INSTRUCTION), atol=1e-5, rtol=0)
    assert (with_ins - emb.embed(items)).abs().max() > 1e-3  # the instruction changes the vector
    mixed = [INSTRUCTION if i % 2 else None for i in range(len(items))]
    with torch.no_grad():
        h = normalized(item_states(model, proc, items, mixed, batch_size=4))
    want = torch.stack([with_ins[i] if i % 2 else emb.embed([x])[0] for i, x in enumerate(items)])
    torch.testing.assert_close(h, want, atol=1e-5, rtol=0)


def test_bad_input_named(model_proc):
    model, proc = model_proc
    emb = Embedder(model, proc)
    with pytest.raises(ValueError, match=r"^item 1: empty text and no image"):
        emb.embed(["fine", "  "])
    with pytest.raises(ValueError, match=r"special token"):
        emb.embed(["fine"], instruction="a <|im_end|> b")
    with pytest.raises(ValueError, match=r"^item 0: prompt has \d+ tokens > max_length=5"):
        Embedder(model, proc, max_length=5).embed(["a longer text than five tokens"])
    with pytest.raises(ValueError, match="non-empty list"):
        emb.embed([])


def brute_force(scores, ids, k):
    """The first k of trec_eval's order of the full score list (metrics.rank)."""
    return [rank({d: float(s) for d, s in zip(ids, row.tolist())})[:k] for row in scores]


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_search_equals_brute_force_with_ties(chunk):
    """Small integer vectors make exact scores and many ties, which must break by doc id descending."""
    g = torch.Generator().manual_seed(chunk)
    corpus = torch.randint(-2, 3, (23, 4), generator=g).float()
    queries = torch.randint(-2, 3, (9, 4), generator=g).float()
    ids = [f"d{i:03d}" for i in torch.randperm(23, generator=g).tolist()]
    ids[5] = "z"  # not all of one length
    scores = queries @ corpus.T
    for k in (1, 5, 23, 40):
        runs = search(queries, corpus, ids, k, chunk)
        assert [rank(r) for r in runs] == brute_force(scores, ids, k)
        assert all(r[d] == float(scores[qi, ids.index(d)]) for qi, r in enumerate(runs) for d in r)
    assert len(set(scores.flatten().tolist())) < scores.numel() // 4  # the case does have ties


def test_search_checks():
    with pytest.raises(ValueError, match="k must be"):
        search(torch.ones(1, 2), torch.ones(3, 2), ["a", "b", "c"], 0)
    with pytest.raises(ValueError, match="3 corpus embeddings but 2 doc ids"):
        search(torch.ones(1, 2), torch.ones(3, 2), ["a", "b"], 1)


def test_a_corpus_document_the_embedder_refuses_is_named_by_dataset_and_id(tmp_path):
    def embed(items):  # refuses like Embedder does: by position in the batch it was given
        for i, item in enumerate(items):
            if item.get("text") == "bad":
                raise ValueError(f"document {i}: text refused")
        return torch.ones(len(items), 4)
    corpus = {f"d{k}": Item(f"d{k}", text="bad" if k == 5 else "fine") for k in range(8)}
    ds = Dataset("toy", "T->T", "find", "ndcg@10", {}, corpus, {}, {}, str(tmp_path))
    with pytest.raises(ValueError, match=r"^toy: corpus document 'd5': document 0: text refused$"):
        corpus_embeddings(embed, ds, chunk=4)
    ids, vectors = corpus_embeddings(embed, Dataset("ok", "T->T", "find", "ndcg@10", {}, {"a": Item("a", "x")}, {},
                                                    {}, str(tmp_path)))
    assert ids == ["a"] and vectors.shape == (1, 4)
