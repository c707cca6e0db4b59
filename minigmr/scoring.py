"""The reranker: score = p(yes) from the yes/no logits at the last position, computed by a fused loop.

A plain implementation runs each of the n (instruction, query, document) prompts through the model and projects
every position onto the whole vocabulary (`reference_logits`, kept for the tests). The fused loop does the same
maths with much less work:

  1. tokenize: every prompt is tokenized whole (ids exactly the plain ones); the longest prefix they all share
     (system + instruction + query, incl. the query image) is encoded once and its keys/values reused;
  2. vision: each distinct image (query and documents) goes through the vision tower once;
  3. documents: sorted by length and cut into batches of at most `batch_size` documents and, on a CPU,
     `max_batch_tokens` padded tokens, left-padded; the last layer only computes the last position;
  4. head: only that hidden state is projected, onto the "yes" and "no" rows of the LM head, in fp32.

Host-side work (tokens, padding, positions, image slots) is done before the loop, which never waits on the device.
Weights are bf16 on a GPU and on a CPU with fast bf16 (hardware.py), else fp32; scores always fp32. A "group" is one query with its documents;
`group_logits` is the same computation with autograd for training, many groups at once.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from .decoder import TextModel, attention_mask_4d, mrope_cos_sin, rope_position_ids
from .files import read_json
from .hardware import default_dtype, reuse_freed_memory
from .hub import resolve
from .lora import merge_lora
from .losses import cl_score, sft_score, yes_no_logits
from .model import Qwen25VL
from .pairs import score_pairs
from .peft_io import load_adapter
from .processor import Processor, pad
from .prompt import (DEFAULT_INSTRUCTION, Item, check_positive, checked_instruction, checked_item, gmr_messages,
                     query_messages)


def default_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # torch names a bad one
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    return device, dtype or default_dtype(device)  # bf16 on CUDA and on CPUs with fast bf16, else fp32


# ----------------------------------------------------------------------------- host-side preparation
class ImageBank:
    """Distinct images (by path or object identity), preprocessed once; their vision features computed once."""

    def __init__(self, processor: Processor):
        self.processor, self.sources, self.owners, self.key_of = processor, [], [], {}

    def add(self, item: Item, where: str) -> list:
        """The bank ids of the item's images ([] or [id]); `where` ("document 3") names it in errors."""
        if item.image is None:
            return []
        key = os.path.abspath(item.image) if isinstance(item.image, str) else id(item.image)
        if key not in self.key_of:
            self.key_of[key] = len(self.sources)
            self.sources.append(item.image)
            self.owners.append(where)
        return [self.key_of[key]]

    def preprocess(self):
        """Patches (n_i, 1176) and grids (3,) of every image, made on torch's CPU threads (Pillow and numpy release the
        GIL); an image that cannot be read or resized is an error naming the first query/document that holds it."""
        def one(source, where):
            try:
                return self.processor.image_processor([source])
            except (ValueError, OSError) as e:  # unreadable file, extreme aspect ratio, too small to resize...
                name = f" ({source})" if isinstance(source, str) else ""
                raise ValueError(f"{where}: image{name}: {e}") from None
        with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), len(self.sources)))) as pool:
            done = list(pool.map(one, self.sources, self.owners))  # in order: the first bad image raises
        self.patches, self.grids = [pixel_values for pixel_values, _ in done], [grid[0] for _, grid in done]

    def features(self, model: Qwen25VL, max_patches: int = 16384) -> list:
        """(tokens_i, D) features per image; the vision tower runs on chunks of at most `max_patches` patches."""
        feats, start, device = [], 0, model.head_weight.device
        merge2 = model.config.vision.spatial_merge_size ** 2
        while start < len(self.patches):
            end, n = start, 0
            while end < len(self.patches) and (end == start or n + len(self.patches[end]) <= max_patches):
                n, end = n + len(self.patches[end]), end + 1
            grids = torch.stack(self.grids[start:end])
            out = model.image_features(torch.cat(self.patches[start:end]).to(device), grids)  # (sum tokens, D)
            feats += list(out.split((grids.prod(-1) // merge2).tolist()))
            start = end
        return feats


class PromptTooLong(ValueError):
    """The prompt of (group, document) has `length` > max_length tokens: nothing is ever truncated."""

    def __init__(self, group: int, document: int, length: int, max_length: int):
        super().__init__(f"group {group} document {document}: prompt has {length} tokens > max_length={max_length}")
        self.group, self.document, self.length = group, document, length


@dataclass
class TokenizedGroup:
    """One query with its documents, tokenized: document i's whole prompt is `prefix + rests[i]`."""
    prefix: list  # token ids shared by every prompt: system, instruction, query (with its image)
    prefix_images: list  # bank ids of the images in the prefix
    rests: list  # per document: the rest of its prompt's token ids
    rest_images: list  # per document: the bank ids of its images

    def check_lengths(self, max_length: int | None, group: int = 0):
        """PromptTooLong for the first document whose whole prompt has more than `max_length` tokens."""
        for j, rest in enumerate(self.rests):
            if max_length is not None and len(self.prefix) + len(rest) > max_length:
                raise PromptTooLong(group, j, len(self.prefix) + len(rest), max_length)


def tokenize_groups(processor: Processor, groups) -> tuple:
    """groups: [(instruction, query, documents)] -> (ImageBank with every distinct image preprocessed,
    [TokenizedGroup]). Every prompt is tokenized whole, so its ids are exactly the plain path's."""
    bank, parsed = ImageBank(processor), []
    for g, (instruction, query, documents) in enumerate(groups):
        at = "" if len(groups) == 1 else f"group {g} "
        instruction = checked_instruction(instruction)
        if not isinstance(documents, (list, tuple)):
            raise TypeError(f"{at}documents must be a non-empty list of documents, got {type(documents).__name__}")
        if not documents:
            raise ValueError(f"{at}documents must be a non-empty list of documents, got an empty list")
        q = checked_item(query, f"{at}query")
        docs = [checked_item(d, f"{at}document {i}") for i, d in enumerate(documents)]
        parsed.append((instruction, q, docs, bank.add(q, f"{at}query"),
                       [bank.add(d, f"{at}document {i}") for i, d in enumerate(docs)]))
    bank.preprocess()  # the grids, hence the image-token counts, are needed to tokenize
    return bank, [split_prefix(processor, bank, *p) for p in parsed]


def split_prefix(processor: Processor, bank: ImageBank, instruction: str, query: Item, docs: list,
                 query_images: list, doc_images: list) -> TokenizedGroup:
    """Tokenize every document's whole prompt and cut off the longest prefix they all share."""
    grids = lambda ids: [bank.grids[i].tolist() for i in ids]
    prefix_text = processor.render(query_messages(instruction, query), add_generation_prompt=False)
    prefix_text = prefix_text[: -len("<|im_end|>\n")]  # the user turn continues with the document
    prefix = np.array(processor.encode(prefix_text, grids(query_images)), dtype=np.int64)
    full = processor.encode_batch([processor.render(gmr_messages(instruction, query, d)) for d in docs],
                                  [grids(query_images + di) for di in doc_images])
    # shared length = the longest prefix every prompt shares with the prefix's own tokens (BPE may merge the
    # query's last characters with the "\n<Document>:" that follows, so it can be a token or two short)
    shared = len(prefix)
    for ids in full:
        n = min(len(ids) - 1, shared)
        diff = np.nonzero(np.asarray(ids[:n]) != prefix[:n])[0]
        shared = int(diff[0]) if len(diff) else n
    if (prefix[shared:] == processor.image_pad_id).any():  # the differing tail is text after <|vision_end|>
        raise AssertionError("the shared prefix ends inside the query image")
    return TokenizedGroup(prefix[:shared].tolist(), query_images, [ids[shared:] for ids in full], doc_images)


def length_batches(lengths, batch_size: int, max_tokens: int | None = None) -> list:
    """Indices sorted by length, longest first, cut into batches of at most `batch_size` items and at most
    `max_tokens` padded tokens (batch size x its longest item; a single longer item still gets its own batch).
    Neighbours in length share a batch, so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = []
    for i in order:
        b = batches[-1] if batches else None
        if b is None or len(b) == batch_size or (max_tokens and (len(b) + 1) * lengths[b[0]] > max_tokens):
            batches.append([i])
        else:
            b.append(i)
    return batches


@dataclass
class Batch:
    """One padded batch of token sequences, built on the host."""
    ids: torch.Tensor  # (B, S) token ids
    mask: torch.Tensor  # (B, S) 1 for a token, 0 for padding
    positions: torch.Tensor  # (3, B, S) M-RoPE positions
    images: list  # bank ids of the images, in token order
    image_slots: torch.Tensor  # flat indices into B*S of the image tokens, in token order
    last: torch.Tensor  # (B,) column of each row's last token

    def to(self, device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # host-to-device copies never wait for the device
        return replace(self, ids=move(self.ids), mask=move(self.mask), positions=move(self.positions),
                       image_slots=move(self.image_slots), last=move(self.last))


def pad_batch(seqs, images, bank: ImageBank, model: Qwen25VL, pad_id: int, side="left", start=0, multiple=1):
    """The Batch of sequences `seqs` (token-id lists) holding the images `images` (bank ids per sequence), padded
    to a multiple of `multiple`, positions starting at `start` (int or one per row)."""
    ids, mask = pad(seqs, pad_id, side, multiple)  # (B, S) each
    imgs = [j for row in images for j in row]
    thw = torch.stack([bank.grids[j] for j in imgs]) if imgs else None
    cfg = model.config
    positions = rope_position_ids(ids, mask, thw, cfg.text, cfg.vision.spatial_merge_size, start)
    slots = torch.nonzero((ids == cfg.text.image_token_id).flatten()).flatten()
    return Batch(ids, mask, positions, imgs, slots, mask.sum(-1) - 1)


# ----------------------------------------------------------------------------- on the device
def embed(model: Qwen25VL, batch: Batch, feats: list) -> torch.Tensor:
    """`Qwen25VL.embed` of a Batch on the device: the image features go to host-known slots (index_copy), so unlike
    masked_scatter no count is read back from the device."""
    x = model.text.embed_tokens(batch.ids)  # (B, S, D)
    if not batch.images:
        return x
    f = torch.cat([feats[i] for i in batch.images]).to(x.dtype)  # (image tokens, D)
    return x.flatten(0, 1).index_copy(0, batch.image_slots, f).view_as(x)  # (B*S, D) -> (B, S, D)


def below_last_layer(text: TextModel, x, positions, mask, past=None, past_mask=None):
    """`text(x, positions, mask, past, past_mask)` up to its last layer, whose work the fused loop trims: the input
    of that layer (B, S, D), its rotary cos/sin and 4-D mask, and the keys/values of the layers before it."""
    cos, sin = mrope_cos_sin(positions, text.cfg, x.dtype)  # (B, 1, S, Dh)
    mask4 = attention_mask_4d(mask, x.shape[1], past_mask)  # (B, 1, S, P+S)
    kvs = []
    for i, layer in enumerate(text.layers[:-1]):
        x, kv = text.run_layer(layer, x, cos, sin, mask4, None if past is None else past[i])
        kvs.append(kv)
    return x, cos, sin, mask4, kvs


def prefix_cache(model: Qwen25VL, batch: Batch, feats: list) -> list:
    """Keys/values (k, v) (B, KV, P, Dh) of every layer for a batch of prefixes: all the last layer computes."""
    x, cos, sin, _, kvs = below_last_layer(model.text, embed(model, batch, feats), batch.positions, batch.mask)
    last = model.text.layers[-1]
    return kvs + [last.attn.key_values(last.attn_norm(x), cos, sin)]


def last_token_states(text: TextModel, x, positions, mask, past, past_mask) -> torch.Tensor:
    """`text(x, positions, mask, past, past_mask)[0][:, -1]` (B, D) for left-padded rows, the only state a
    reranker reads. The last layer runs its queries, MLP and norm on the last column alone, the keys/values of the
    columns before it joining the prefix: one layer's work fewer per document token (docs/experiments.md)."""
    x, cos, sin, mask4, _ = below_last_layer(text, x, positions, mask, past, past_mask)
    last = text.layers[-1]
    k, v = last.attn.key_values(last.attn_norm(x[:, :-1]), cos[..., :-1, :], sin[..., :-1, :])  # (B, KV, S-1, Dh)
    before = [torch.cat((old.expand(len(x), -1, -1, -1), new), dim=2) for old, new in zip(past[-1], (k, v))]
    x, _ = text.run_layer(last, x[:, -1:], cos[..., -1:, :], sin[..., -1:, :], mask4[..., -1:, :], before)
    return text.norm(x[:, 0])


# ----------------------------------------------------------------------------- training path (autograd)
def group_logits(model: Qwen25VL, processor: Processor, groups, yes_no=None, max_batch_tokens=None,
                 max_length=None, return_lengths=False):
    """[z_yes, z_no] (M, 2) fp32 for every document of every group, with autograd, for training.

    groups: list of (instruction, query, documents). All prefixes run as one left-padded batch (G, P); the
    documents, sorted by length, in batches of at most `max_batch_tokens` padded tokens (default: 2048 on a CPU,
    where small buffers are reused, unbounded on a GPU) on top of their own group's prefix keys/values (gathered
    per row). Sorting cuts the padding of one (M, longest) batch.
    A prompt longer than `max_length` tokens raises ValueError naming (group, document): nothing is truncated.
    return_lengths: also return the M full prompt lengths (list of int), e.g. for a tokens/s log."""
    bank, tokenized = tokenize_groups(processor, groups)
    lengths = [len(g.prefix) + len(r) for g in tokenized for r in g.rests]  # (M,) group-major, as the output rows
    for gi, g in enumerate(tokenized):
        g.check_lengths(max_length, gi)
    feats, device = bank.features(model), model.head_weight.device
    prefixes = pad_batch([g.prefix for g in tokenized], [g.prefix_images for g in tokenized], bank, model,
                         processor.pad_id)
    starts = prefixes.positions.amax(dim=(0, 2)) + 1  # (G,) next position after each prefix (host tensor)
    prefixes = prefixes.to(device)
    past = prefix_cache(model, prefixes, feats)
    group_of = torch.tensor([gi for gi, g in enumerate(tokenized) for _ in g.rests])  # (M,) group of each document
    rests = [r for g in tokenized for r in g.rests]
    rest_images = [i for g in tokenized for i in g.rest_images]
    if max_batch_tokens is None and device.type == "cpu":
        max_batch_tokens = 2048
    hs, order = [], []
    for b in length_batches([len(r) for r in rests], len(rests), max_batch_tokens):
        batch = pad_batch([rests[i] for i in b], [rest_images[i] for i in b], bank, model, processor.pad_id,
                          start=starts[group_of[b]].tolist()).to(device)
        rows = group_of[b].to(device)
        past_b = [(k[rows], v[rows]) for k, v in past]  # (B, KV, P, Dh): each document sees its own group's prefix
        hs.append(last_token_states(model.text, embed(model, batch, feats), batch.positions, batch.mask, past_b,
                                    prefixes.mask[rows]))
        order += b
    h = torch.cat(hs)[torch.tensor(order).argsort().to(device)]  # (M, D) back in group-major document order
    yes_no = yes_no or (processor.token_id("yes"), processor.token_id("no"))
    z = yes_no_logits(h, model.head_rows(list(yes_no)))
    return (z, lengths) if return_lengths else z


# ----------------------------------------------------------------------------- inference
# A checkpoint folder may say which score it is read with: train.py writes {"score": "cl"} for an InfoNCE-trained
# model, whose "no" logit no loss ever constrained, so p(yes) would rank by noise (docs/gmr.md §1.2: s_CL = z_yes).
SCORE_FILE = "minigmr_reranker.json"


def checkpoint_score(path: str) -> str:
    """The score a checkpoint folder asks for in SCORE_FILE: "sft" (p(yes)) or "cl" (z_yes); "sft" if absent."""
    file = os.path.join(path, SCORE_FILE)
    if not os.path.exists(file):
        return "sft"
    record = read_json(file)
    score = record.get("score") if isinstance(record, dict) else None
    if score not in ("sft", "cl"):
        raise ValueError(f"{file}: 'score' must be 'sft' or 'cl', got {score!r}")
    return score


class Reranker:
    def __init__(self, model: Qwen25VL, processor: Processor, batch_size: int = 16, padding_side: str = "left",
                 max_length: int | None = None, score_type: str = "sft"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        check_positive("batch_size", batch_size)
        check_positive("max_length", max_length, none_ok=True)
        if score_type not in ("sft", "cl"):
            raise ValueError(f"score_type must be 'sft' (p(yes)) or 'cl' (the yes logit), got {score_type!r}")
        self.model, self.processor, self.score_type = model.eval(), processor, score_type
        self.device = model.head_weight.device
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        cpu = self.device.type == "cpu"
        # vision chunk (patches) and text batch (padded tokens) caps: on a CPU smaller buffers are reused instead of
        # freshly mapped (page faults); on a GPU they only bound memory (docs/experiments.md)
        self.image_batch_patches = 4096 if cpu else 16384
        self.max_batch_tokens = 2048 if cpu else None
        if cpu:
            reuse_freed_memory()  # activations freed and re-allocated per batch come back without page faults
        # padded lengths rounded up on a GPU so compiled kernels / CUDA graphs see few distinct shapes
        self.pad_multiple = 8 if self.device.type == "cuda" else 1
        self.yes_id, self.no_id = processor.token_id("yes"), processor.token_id("no")

    @classmethod
    def from_pretrained(cls, path: str, adapter: str | None = None, dtype=None, device=None, min_pixels=None,
                        max_pixels=None, score_type: str | None = None, **kw) -> "Reranker":
        """A checkpoint in the official layout, as a folder or a hub id (hub.py), with an optional LoRA adapter (folder
        or hub id; minigmr or peft format) merged in; min_pixels / max_pixels override preprocessor_config.json's;
        `kw` goes to the constructor; score_type "sft" or "cl", default: the checkpoint's SCORE_FILE, else "sft"."""
        (path, adapter), (device, dtype) = (resolve(path), resolve(adapter)), default_device_dtype(device, dtype)
        model = Qwen25VL.from_pretrained(path, dtype=dtype, device=device)
        if adapter is not None:
            load_adapter(model, adapter)
            merge_lora(model)
        return cls(model, Processor.from_pretrained(path, min_pixels, max_pixels),
                   score_type=score_type or checkpoint_score(path), **kw)

    def score(self, query, documents, instruction: str | None = DEFAULT_INSTRUCTION, batch_size=None) -> list:
        """One fp32 score per document: p(yes | instruction, query, document), the softmax over the yes/no logits
        (score_type "sft"), or the yes logit z_yes (score_type "cl", for models trained with InfoNCE)."""
        z = self.logits(query, documents, instruction, batch_size)
        return (sft_score(z) if self.score_type == "sft" else cl_score(z)).tolist()

    def score_pairs(self, pairs, instruction=DEFAULT_INSTRUCTION, batch_size=None, show_progress_bar=None) -> list:
        return score_pairs(self, pairs, instruction, batch_size, show_progress_bar)  # mixed queries: pairs.py

    def rank(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, top_k=None, batch_size=None,
             return_documents: bool = False) -> list:
        """[(index, score)] sorted by score, best first (ties: lower index first); the first `top_k` only
        (None: all; more than there are: all). return_documents: [(index, score, document)]."""
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
            error = ValueError if isinstance(top_k, int) and not isinstance(top_k, bool) else TypeError
            raise error(f"top_k must be None or an integer >= 0, got {top_k!r}")
        scores = self.score(query, documents, instruction, batch_size)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, scores[i], documents[i]) if return_documents else (i, scores[i]) for i in order[:top_k]]

    @torch.no_grad()
    def logits(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, batch_size=None) -> torch.Tensor:
        """(n, 2) fp32 [z_yes, z_no] at the last position of each (instruction, query, document) prompt.
        instruction=None means the default instruction."""
        proc, model, device = self.processor, self.model, self.device
        check_positive("batch_size", batch_size, none_ok=True)
        bank, (group,) = tokenize_groups(proc, [(instruction, query, documents)])
        group.check_lengths(self.max_length)
        feats = bank.features(model, self.image_batch_patches)  # vision tower once per distinct image
        head = model.head_rows([self.yes_id, self.no_id])  # (2, D)
        # host-side plan: length-sorted batches of candidates, everything padded and indexed in advance
        prefix = pad_batch([group.prefix], [group.prefix_images], bank, model, proc.pad_id)
        start = int(prefix.positions.max()) + 1
        batches = length_batches([len(r) for r in group.rests], batch_size or self.batch_size, self.max_batch_tokens)
        plan = [(torch.tensor(b), pad_batch([group.rests[i] for i in b], [group.rest_images[i] for i in b], bank,
                                            model, proc.pad_id, self.padding_side, start, self.pad_multiple))
                for b in batches]
        prefix = prefix.to(device)
        past = prefix_cache(model, prefix, feats)  # the shared prefix, once
        out = torch.empty(len(group.rests), 2, device=device)
        for index, batch in plan:  # no host synchronisation in here
            batch = batch.to(device)
            x = embed(model, batch, feats)
            if self.padding_side == "left":
                h = last_token_states(model.text, x, batch.positions, batch.mask, past, prefix.mask)
            else:
                h, _ = model.text(x, batch.positions, batch.mask, past, prefix.mask)
                h = h[torch.arange(len(h), device=device), batch.last]
            out[index.to(device, non_blocking=True)] = yes_no_logits(h, head)
        return out.cpu()


@torch.no_grad()
def reference_logits(model: Qwen25VL, processor: Processor, query, documents,
                     instruction: str = DEFAULT_INSTRUCTION, padding_side: str = "left") -> torch.Tensor:
    """The plain path: every full prompt through the model, full-vocabulary logits, last valid position,
    yes/no columns. (n, 2) fp32 [z_yes, z_no]."""
    batch = processor.apply_chat([gmr_messages(instruction, query, d) for d in documents], padding_side=padding_side)
    device = model.head_weight.device
    batch = {k: v.to(device) if v is not None else None for k, v in batch.items()}
    logits = model(**batch)  # (B, S, V)
    last = batch["attention_mask"].sum(-1) - 1 if padding_side == "right" else torch.full_like(
        batch["attention_mask"][:, 0], logits.shape[1] - 1)
    rows = logits[torch.arange(logits.shape[0], device=device), last]  # (B, V)
    return rows[:, [processor.token_id("yes"), processor.token_id("no")]].float().cpu()
