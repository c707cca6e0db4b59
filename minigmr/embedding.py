"""The embedder: Qwen2.5-VL as a first-stage retriever, the last token's state of a prompt asking for one word.

E5-V (arXiv 2407.12580) and VladVA (arXiv 2412.04378, docs/gmr.md §8) turn a generative vision-language model into
an embedder without a new head: the input goes into a prompt that ends by asking the model to sum it up in one word,
and the final hidden state at the prompt's last position (where the model would write that word) is the
embedding. Queries and documents go through the same model one at a time (a bi-encoder) and are compared by cosine
similarity, so a corpus is embedded once and searched with matrix products; a reranker (scoring.py) instead reads
every (query, document) pair together, which is better and far dearer: hence retrieve, then rerank.

The prompt, in one place (`embed_messages`), rendered with the Qwen2.5-VL chat template:

    <|im_start|>system
    {instruction, or "You are a helpful assistant."}<|im_end|>
    <|im_start|>user
    [<|vision_start|><|image_pad|>...<|vision_end|>][text]
    Summarize above {sentence | image | image and sentence} in one word:<|im_end|>
    <|im_start|>assistant
                                             <- the embedding is the state here, after "assistant\\n"

The summary sentence is E5-V's zero-shot prompt, which VladVA trains with (it also learns soft prompts, not done
here). GME (gme-Qwen2-VL, MRB's first stage, docs/gmr.md §8) reads the last token of a Qwen2-VL prompt too and puts
a task instruction into the prompt of the *queries* only; here the instruction takes the system turn: eval.py
passes each dataset's instruction for its queries and none for its corpus, train.py the record's instruction for
the query and none for the documents, so a corpus is embedded once for every instruction.

Batching is the scorer's (scoring.py): each distinct image goes through the vision tower once, prompts are
length-sorted into token-capped batches, left-padded, and the system turn every prompt of one instruction shares
is encoded once (its keys/values reused). `item_states` keeps autograd for training; `Embedder.embed` is inference.
"""
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hardware import reuse_freed_memory
from .lora import merge_lora
from .model import Qwen25VL
from .peft_io import load_adapter
from .processor import DEFAULT_SYSTEM_PROMPT, Processor
from .prompt import Item, check_positive, checked_instruction, checked_item
from .scoring import (SCORE_FILE, ImageBank, default_device_dtype, embed, last_token_states, length_batches, pad_batch,
                      prefix_cache)

SUMMARY = {"text": "sentence", "image": "image", "both": "image and sentence"}  # E5-V: what "above" is
# A merged embedder export holds this file (train.py --objective embed), so that eval.py can tell it from a reranker.
EMBEDDER_FILE = "minigmr_embedder.json"


def summary_prompt(item: Item) -> str:
    """The words that close the user turn: E5-V's "Summarize above ... in one word:"."""
    kind = "both" if item.image is not None and item.text is not None else "image" if item.image is not None else "text"
    return f"\nSummarize above {SUMMARY[kind]} in one word:"


def embed_messages(item: Item, instruction: str | None = None) -> list:
    """The conversation (Hugging Face messages format) whose last position embeds `item`; instruction=None: the
    Qwen default system prompt (documents), else the task instruction (queries)."""
    content = [] if item.image is None else [{"type": "image", "image": item.image}]
    content += [] if item.text is None else [{"type": "text", "text": item.text}]
    content.append({"type": "text", "text": summary_prompt(item)})
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT if instruction is None else instruction},
            {"role": "user", "content": content}]


@dataclass
class SharedPrefix:
    """Prompts of one instruction, tokenized: prompt k is `prefix + rests[k]`, the input's item `index[k]`."""
    prefix: list  # token ids of the system turn and "<|im_start|>user\n" (no image)
    rests: list  # per prompt: the rest of its token ids
    rest_images: list  # per prompt: the bank ids of its images
    index: list  # per prompt: its position in the input list


def tokenize_items(processor: Processor, items, instructions, what: str = "item") -> tuple:
    """-> (ImageBank with every distinct image preprocessed, [SharedPrefix], one per distinct instruction).
    Every prompt is tokenized whole; bad items and instructions are errors naming `what` and the index."""
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"need a non-empty list of {what}s, got {items!r:.100}")
    if len(instructions) != len(items):
        raise ValueError(f"{len(items)} {what}s but {len(instructions)} instructions")
    bank, parsed, groups = ImageBank(processor), [], {}
    for i, (x, ins) in enumerate(zip(items, instructions)):
        item = checked_item(x, f"{what} {i}")
        ins = None if ins is None else checked_instruction(ins)
        parsed.append((item, bank.add(item, f"{what} {i}")))
        groups.setdefault(ins, []).append(i)
    bank.preprocess()  # the grids, hence the image-token counts, are needed to tokenize
    out = []
    for ins, index in groups.items():
        system = processor.render(embed_messages(Item(text="x"), ins)[:1], add_generation_prompt=False)
        head = processor.encode(system + "<|im_start|>user\n")
        full = [processor.encode(processor.render(embed_messages(parsed[i][0], ins)),
                                 [bank.grids[j].tolist() for j in parsed[i][1]]) for i in index]
        shared = len(head)  # at most the system turn (never an image), and every prompt keeps its last token
        for ids in full:
            n = min(len(ids) - 1, shared)
            shared = next((t for t in range(n) if ids[t] != head[t]), n)
        out.append(SharedPrefix(head[:shared], [ids[shared:] for ids in full], [parsed[i][1] for i in index], index))
    return bank, out


def item_states(model: Qwen25VL, processor: Processor, items, instructions, padding_side: str = "left",
                batch_size: int | None = None, max_batch_tokens: int | None = None, max_length: int | None = None,
                pad_multiple: int = 1, image_batch_patches: int = 16384, what: str = "item", return_lengths=False):
    """Final hidden states (n, D) at the last position of each item's prompt, in the model's dtype, with autograd
    when it is enabled (training). instructions: one per item (None: the default system prompt).
    return_lengths: also return the n prompt lengths (list of int), e.g. for a tokens/s log."""
    bank, groups = tokenize_items(processor, items, instructions, what)
    for g in groups:
        for k, rest in enumerate(g.rests):
            if max_length is not None and len(g.prefix) + len(rest) > max_length:
                raise ValueError(f"{what} {g.index[k]}: prompt has {len(g.prefix) + len(rest)} tokens > "
                                 f"max_length={max_length}; nothing is truncated")
    feats, device = bank.features(model, image_batch_patches), model.head_weight.device  # vision tower once per image
    if max_batch_tokens is None and device.type == "cpu":
        max_batch_tokens = 2048  # as the scorer: small buffers are reused on a CPU
    hs, order = [], []
    for g in groups:
        prefix = pad_batch([g.prefix], [[]], bank, model, processor.pad_id)
        start = int(prefix.positions.max()) + 1
        prefix = prefix.to(device)
        past = prefix_cache(model, prefix, feats)  # the shared system turn, once per instruction
        for b in length_batches([len(r) for r in g.rests], batch_size or len(g.rests), max_batch_tokens):
            batch = pad_batch([g.rests[i] for i in b], [g.rest_images[i] for i in b], bank, model, processor.pad_id,
                              padding_side, start, pad_multiple).to(device)
            x = embed(model, batch, feats)
            if padding_side == "left":
                h = last_token_states(model.text, x, batch.positions, batch.mask, past, prefix.mask)
            else:
                h, _ = model.text(x, batch.positions, batch.mask, past, prefix.mask)
                h = h[torch.arange(len(h), device=device), batch.last]
            hs.append(h)
            order += [g.index[i] for i in b]
    h = torch.cat(hs)[torch.tensor(order).argsort().to(device)]  # (n, D) back in input order
    if not return_lengths:
        return h
    lengths = [0] * len(order)
    for g in groups:
        for k, rest in zip(g.index, g.rests):
            lengths[k] = len(g.prefix) + len(rest)
    return h, lengths


def normalized(h: torch.Tensor) -> torch.Tensor:
    """L2-normalised fp32 embeddings (n, D): cosine similarity is then a dot product."""
    return F.normalize(h.float(), dim=-1)


class Embedder:
    """items -> L2-normalised fp32 embeddings (n, D) from the last position of the "in one word" prompt."""

    def __init__(self, model: Qwen25VL, processor: Processor, batch_size: int = 32, padding_side: str = "left",
                 max_length: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        check_positive("batch_size", batch_size)
        check_positive("max_length", max_length, none_ok=True)
        self.model, self.processor = model.eval(), processor
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        cpu = model.head_weight.device.type == "cpu"
        self.image_batch_patches = 4096 if cpu else 16384  # as Reranker: reused buffers on a CPU
        if cpu:
            reuse_freed_memory()  # as Reranker: no page faults for activations freed and re-allocated per batch
        self.pad_multiple = 8 if model.head_weight.device.type == "cuda" else 1  # few shapes for compiled kernels

    @classmethod
    def from_pretrained(cls, path: str, adapter: str | None = None, dtype=None, device=None, min_pixels=None,
                        max_pixels=None, **kw) -> "Embedder":
        """Any minigmr / official Qwen2.5-VL checkpoint folder, optionally with a LoRA adapter folder (minigmr or
        peft format) merged in; bf16 on a GPU or a CPU with fast bf16, else fp32 (hardware.py); `kw` goes to the
        constructor."""
        device, dtype = default_device_dtype(device, dtype)
        model = Qwen25VL.from_pretrained(path, dtype=dtype, device=device)
        if adapter is not None:
            load_adapter(model, adapter)
            merge_lora(model)
        return cls(model, Processor.from_pretrained(path, min_pixels, max_pixels), **kw)

    @torch.no_grad()
    def embed(self, items, instruction: str | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(n, D) fp32 unit vectors on the CPU, one per item (str, path, PIL image or {"text", "image"} dict).
        instruction: the task instruction for queries; None (documents): the default system prompt."""
        check_positive("batch_size", batch_size, none_ok=True)
        if not isinstance(items, (list, tuple)):  # a bare str or dict is one item, not a list of them
            raise TypeError(f"items must be a list of queries/documents, got {type(items).__name__}")
        h = item_states(self.model, self.processor, items, [instruction] * len(items), self.padding_side,
                        batch_size or self.batch_size, None, self.max_length, self.pad_multiple,
                        self.image_batch_patches)
        return normalized(h).cpu()


# ----------------------------------------------------------------------------- training (train.py --objective embed)
def mark_embedder(folder: str) -> None:
    """Mark a merged export (train_state.export_merged) as an embedder: EMBEDDER_FILE instead of the reranker's
    score file, so that it is not read as a reranker by mistake."""
    if os.path.exists(os.path.join(folder, SCORE_FILE)):
        os.remove(os.path.join(folder, SCORE_FILE))
    with open(os.path.join(folder, EMBEDDER_FILE), "w") as f:
        json.dump({"embedding": "last-token state of the one-word prompt (minigmr/embedding.py)"}, f)
        f.write("\n")


def description_batch(processor: Processor, convs) -> tuple:
    """Right-padded batch of (embedding prompt -> assistant answer) chats and its labels (B, S-1): the next token
    at every answer position (the answer and its <|im_end|>), -100 elsewhere, as pretrain.caption_batch."""
    batch = processor.apply_chat(convs, add_generation_prompt=False, padding_side="right")
    ids, mask, assistant = batch["input_ids"], batch["attention_mask"], processor.token_id("assistant")
    labels = torch.full_like(ids[:, 1:], -100)  # (B, S-1): labels[:, t] is the token after position t
    for b in range(ids.shape[0]):
        start, end = int((ids[b] == assistant).nonzero()[-1]) + 1, int(mask[b].sum()) - 1
        labels[b, start:end - 1] = ids[b, start + 1:end]
    return batch, labels


class GroupEmbedder(nn.Module):
    """What train.py wraps in DDP for --objective embed (DDP syncs only through forward): TrainGroups ->
    (q (G, D), d (G*(1+N), D) unit fp32 vectors, positive (G,) index of each query's positive in d, exclude (G,
    G*(1+N)) True where d_j is one of query i's record's positives but not its own, (answer logits (n, V), labels
    (n,)) of the records' descriptions or None), and the prompt lengths. Queries carry their record's instruction."""

    def __init__(self, model: Qwen25VL, processor: Processor, max_length: int | None = None, descriptions=True,
                 trained_vision=()):
        super().__init__()
        self.model, self.processor, self.max_length, self.descriptions = model, processor, max_length, descriptions
        self.trained_vision = list(trained_vision)

    def forward(self, groups):
        G, docs = len(groups), [d for g in groups for d in (g.positive, *g.negatives)]
        items = [g.record.query.as_input() for g in groups] + [d.as_input() for d in docs]
        owner = list(range(G)) + [i for i, g in enumerate(groups) for _ in range(1 + len(g.negatives))]
        try:
            h, lengths = item_states(self.model, self.processor, items, [g.record.instruction for g in groups] +
                                     [None] * len(docs), max_length=self.max_length, return_lengths=True)
        except ValueError as e:  # "item k: ...": name the record and the role instead
            m = re.match(r"item (\d+): (.*)", str(e), re.S)
            if not m:
                raise
            k = int(m.group(1))
            raise ValueError(f"record {groups[owner[k]].record.id!r}: {'query' if k < G else 'document'}: "
                             f"{m.group(2)}") from None
        e = normalized(h)
        if self.trained_vision and not any("image" in x for x in items):
            # text only: tie the trained vision weights in with weight 0 (every trained weight in every graph, DDP)
            e = e + 0.0 * sum(param.sum() for param in self.trained_vision)
        positive = torch.tensor([sum(1 + len(g.negatives) for g in groups[:i]) for i in range(G)])
        keys = [(d.text, d.image) for d in docs]
        exclude = torch.tensor([[k in {(p.text, p.image) for p in g.record.positives} for k in keys] for g in groups])
        lm, described = None, [g.record for g in groups if g.record.description] if self.descriptions else []
        if described:
            convs = [embed_messages(r.positives[0]) + [{"role": "assistant", "content": r.description}]
                     for r in described]
            batch, labels = description_batch(self.processor, convs)
            dev, pv, grid = e.device, batch["pixel_values"], batch["image_grid_thw"]
            hd, _ = self.model.hidden_states(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                                             None if pv is None else pv.to(dev), None if grid is None else grid.to(dev))
            keep = (labels != -100).to(dev)  # (B, S-1): only the answer positions reach the head
            lm = (hd[:, :-1][keep] @ self.model.head_weight.T, labels[labels != -100].to(dev))  # (n, V), (n,)
        return (e[:G], e[G:], positive.to(e.device), exclude.to(e.device), lm), lengths


def search(queries: torch.Tensor, corpus: torch.Tensor, doc_ids: list, k: int, chunk: int = 4096) -> list:
    """Exact top-k by cosine similarity (dot products of unit vectors): for every query a {doc_id: score} of its
    min(k, n) best documents, the same k that trec_eval's order of the full score list (score descending, ties by
    doc id descending) puts first. Score blocks are at most `chunk` x `chunk`, so memory stays bounded."""
    check_positive("k", k)
    if corpus.shape[0] != len(doc_ids):
        raise ValueError(f"{corpus.shape[0]} corpus embeddings but {len(doc_ids)} doc ids")
    by_id = sorted(range(len(doc_ids)), key=lambda i: doc_ids[i], reverse=True)
    tie = torch.empty(len(doc_ids), dtype=torch.long)
    tie[torch.tensor(by_id, dtype=torch.long)] = torch.arange(len(doc_ids))  # 0 = first among equal scores
    runs = []
    for q0 in range(0, len(queries), chunk):
        q = queries[q0:q0 + chunk].float()
        best_s, best_i = q.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long)
        for c0 in range(0, len(doc_ids), chunk):
            s = q @ corpus[c0:c0 + chunk].float().T  # (queries, chunk) fp32
            cand_s = torch.cat([best_s, s], 1)
            cand_i = torch.cat([best_i, torch.arange(c0, c0 + s.shape[1]).expand(len(q), -1)], 1)
            by_tie = tie[cand_i].argsort(dim=1, stable=True)  # ties first, then a stable sort by score
            cand_s, cand_i = cand_s.gather(1, by_tie), cand_i.gather(1, by_tie)
            by_score = (-cand_s).argsort(dim=1, stable=True)[:, :k]
            best_s, best_i = cand_s.gather(1, by_score), cand_i.gather(1, by_score)
        runs += [{doc_ids[i]: float(v) for i, v in zip(row_i.tolist(), row_s.tolist())}
                 for row_s, row_i in zip(best_s, best_i)]
    return runs
