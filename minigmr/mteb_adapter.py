"""minigmr's Reranker as an mteb (2.x) cross-encoder, the task's instruction given as GMR's instruction.

mteb evaluates a cross-encoder through `predict(inputs1, inputs2, *, task_metadata, hf_split, hf_subset,
prompt_type=None, **kwargs)` (mteb models/models_protocols.py CrossEncoderProtocol): two dataloaders of query and
document batches, row i of one paired with row i of the other, one score per pair. Each batch is a dict of
columns; an item is its "text" (a document's title already joined to it by mteb) and its "image" (a PIL image),
either of which may be absent or empty. The instruction is the task's `prompt` (its query prompt when the task
gives one per side), as mteb's Qwen3VLRerankerWrapper reads it; a task without one gets minigmr's default.

Two-stage evaluation (mteb's reranking flow), any first stage then minigmr:

    import mteb
    from minigmr.mteb_adapter import MtebReranker
    task = mteb.get_task("VidoreDocVQARetrieval")
    mteb.evaluate(mteb.get_model("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct"), task, prediction_folder="preds")
    task = task.convert_to_reranking("preds", top_k=100)          # each query's first-stage top 100
    print(mteb.evaluate(MtebReranker("vec-ai/lychee-rerank-mm"), task, cache=None))

mteb is imported here only, and only when an adapter is built: it is an optional extra (pip install 'minigmr[mteb]').
"""
import numpy as np

from .hub import resolve
from .scoring import Reranker


def task_instruction(task_metadata) -> str | None:
    """The task's prompt (a str, or a dict whose "query" entry, else first entry, is used); None if it has none."""
    prompt = getattr(task_metadata, "prompt", None)
    if isinstance(prompt, dict):
        prompt = prompt.get("query") or next(iter(prompt.values()), None)
    return prompt.strip() if isinstance(prompt, str) and prompt.strip() else None


def batch_items(batch: dict, side: str, offset: int) -> list:
    """The rows of one mteb batch as minigmr items ({"text"?, "image"?}); an empty row is an error naming it."""
    n = len(next(iter(batch.values())))
    texts, images, ids = batch.get("text") or [None] * n, batch.get("image") or [None] * n, batch.get("id")
    items = []
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        text = text if text and text.strip() else None  # mteb gives "" for an image-only item
        item = {k: v for k, v in (("text", text), ("image", image)) if v is not None}
        if not item:
            name = f"id {ids[i]!r}" if ids is not None else f"row {offset + i}"
            raise ValueError(f"mteb {side} {name}: neither text nor image")
        items.append(item)
    return items


class MtebReranker:
    """An mteb cross-encoder over `Reranker.from_pretrained(model_name)` (a folder, or a hub id at `revision`), or
    over a given `reranker`. kwargs (dtype, adapter, batch_size, ...) go to Reranker.from_pretrained."""

    def __init__(self, model_name: str | None = None, revision: str | None = None, device: str | None = None, *,
                 reranker: Reranker | None = None, **kwargs):
        from mteb.models.model_meta import ModelMeta

        if (model_name is None) == (reranker is None):
            raise ValueError("give exactly one of model_name (a checkpoint folder or hub id) and reranker")
        self.reranker = reranker or Reranker.from_pretrained(resolve(model_name, revision), device=device, **kwargs)
        name = model_name if model_name and "/" in model_name else f"minigmr/{model_name or 'reranker'}"
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name, revision=revision, loader=MtebReranker, modalities=["text", "image"], use_instructions=True,
            framework=["PyTorch"]))

    def predict(self, inputs1, inputs2, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                **kwargs) -> np.ndarray:
        """One fp32 score per (query, document) pair: Reranker.score's (p(yes), or z_yes for a "cl" model)."""
        pairs = []
        for queries, documents in zip(inputs1, inputs2, strict=True):
            q, d = batch_items(queries, "query", len(pairs)), batch_items(documents, "document", len(pairs))
            if len(q) != len(d):
                raise ValueError(f"mteb gave a batch of {len(q)} queries with {len(d)} documents")
            pairs += zip(q, d)
        scores = self.reranker.score_pairs(pairs, task_instruction(task_metadata),
                                           show_progress_bar=kwargs.get("show_progress_bar"))
        return np.asarray(scores, dtype=np.float32)
