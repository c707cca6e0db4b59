"""The reranker: score = p(yes) from the yes/no logits at the last position, computed by a fused loop.

For one query and n candidate documents a plain implementation runs n full prompts through the model and
projects every position onto the whole vocabulary. The fused loop does the same maths with much less work:

  1. tokenize: every candidate's full prompt is tokenized as a whole (so ids are exactly the plain ones); the
     longest prefix common to all of them (system + instruction + query, incl. the query image) is the shared part;
  2. vision: each distinct image (query and documents) goes through the vision tower once;
  3. prefix: the shared part is encoded once; its keys/values are reused by every candidate;
  4. candidates: sorted by length and cut into batches of at most `batch_size` candidates and (on a CPU)
     `max_batch_tokens` padded tokens (little padding, buffers small enough to be reused), left-padded, and run
     on top of the prefix keys/values; the last layer only computes the last position (`last_only`);
  5. head: only the last hidden state is projected, and only onto the "yes" and "no" rows of the LM head, in fp32.

All host-side work (tokens, padding, position ids, image-token indices) is done before the loop, so the loop has
no host synchronisation (no `.item()`, no branching on device values) and can run under CUDA graphs /
torch.compile. Weights are bf16 on a GPU and fp32 on a CPU; scores are always fp32.
`group_logits` is the same computation with autograd for training (many queries at once, all candidates in one
batch); `reference_logits` is the plain path, kept for the tests to compare against.
"""
import json
import os

import numpy as np
import torch

from .decoder import rope_position_ids
from .losses import cl_score, sft_score, yes_no_logits
from .model import Qwen25VL
from .processor import Processor
from .prompt import DEFAULT_INSTRUCTION, as_item, gmr_messages, query_messages


def default_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


# ----------------------------------------------------------------------------- host-side preparation
class ImageBank:
    """Distinct images (by path or object identity), preprocessed once; their vision features computed once."""

    def __init__(self, processor: Processor):
        self.processor, self.sources, self.key_of = processor, [], {}

    def add(self, image) -> int:
        key = os.path.abspath(image) if isinstance(image, str) else id(image)
        if key not in self.key_of:
            self.key_of[key] = len(self.sources)
            self.sources.append(image)
        return self.key_of[key]

    def preprocess(self):
        """Patches (n_i, 1176) and grids (3,) of every image, in one image-processor call."""
        if not self.sources:
            self.patches, self.grids = [], []
            return
        pixel_values, grids = self.processor.image_processor(self.sources)
        self.patches, self.grids = list(pixel_values.split(grids.prod(-1).tolist())), list(grids)

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


def tokenize_group(processor: Processor, bank: ImageBank, instruction, query, documents):
    """Token ids of the shared prefix and of each document's remainder, and the images (bank ids) of each part."""
    if isinstance(documents, (str, dict)) or not len(documents):
        raise ValueError("documents must be a non-empty list")
    q, docs = as_item(query), [as_item(d) for d in documents]
    q_imgs = [bank.add(q.image)] if q.image is not None else []
    d_imgs = [[bank.add(d.image)] if d.image is not None else [] for d in docs]
    return q, docs, q_imgs, d_imgs


def finish_group(processor: Processor, bank: ImageBank, instruction, q, docs, q_imgs, d_imgs):
    """After `bank.preprocess()` (grids known): the prefix ids and the per-document remainder ids."""
    grid = lambda ids: [bank.grids[i].tolist() for i in ids]
    prefix_text = processor.render(query_messages(instruction, q), add_generation_prompt=False)
    prefix_text = prefix_text[: -len("<|im_end|>\n")]  # the user turn continues with the document
    prefix = np.array(processor.encode(prefix_text, grid(q_imgs)), dtype=np.int64)
    full = [processor.encode(processor.render(gmr_messages(instruction, q, d)), grid(q_imgs + di))
            for d, di in zip(docs, d_imgs)]
    # shared length = the longest prefix every prompt shares with the prefix's own tokens (BPE may merge the
    # query's last characters with the "\n<Document>:" that follows, so it can be a token or two short)
    shared = len(prefix)
    for ids in full:
        n = min(len(ids) - 1, shared)
        diff = np.nonzero(np.asarray(ids[:n]) != prefix[:n])[0]
        shared = int(diff[0]) if len(diff) else n
    if (prefix[shared:] == processor.image_pad_id).any():  # the differing tail is text after <|vision_end|>
        raise AssertionError("the shared prefix ends inside the query image")
    return prefix[:shared].tolist(), [ids[shared:] for ids in full]


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


def pad_batch(seqs, images, bank: ImageBank, model: Qwen25VL, pad_id: int, side="left", start=0, multiple=1):
    """Host tensors for one batch of sequences: ids/mask (B, S), 3-D positions (3, B, S) starting at `start`
    (int or per-row list), the flat indices of image tokens, the images needed (bank ids, in order), and the
    index of each row's last token."""
    S = max(len(s) for s in seqs)
    S = -(-S // multiple) * multiple
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)  # (B, S)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        cols = slice(S - len(s), S) if side == "left" else slice(0, len(s))
        ids[r, cols], mask[r, cols] = torch.tensor(s, dtype=torch.long), 1
    imgs = [j for row in images for j in row]
    thw = torch.stack([bank.grids[j] for j in imgs]) if imgs else None
    cfg = model.config
    pos = rope_position_ids(ids, mask, thw, cfg.text, cfg.vision.spatial_merge_size,
                            start=torch.as_tensor(start))  # (3, B, S)
    return dict(ids=ids, mask=mask, pos=pos, images=imgs, last=mask.sum(-1) - 1,
                img_pos=torch.nonzero((ids == cfg.text.image_token_id).flatten()).flatten())


def run_batch(model: Qwen25VL, batch: dict, feats: list, past=None, past_mask=None, last_only=False):
    """Hidden states of one `pad_batch` batch on the model's device: (B, D) at each row's last token."""
    device = model.head_weight.device
    to = lambda t: t.to(device, non_blocking=True)
    img_feats = torch.cat([feats[i] for i in batch["images"]]) if batch["images"] else None
    h, kv = model.hidden_states(to(batch["ids"]), to(batch["mask"]), image_features=img_feats, past=past,
                                past_mask=past_mask, position_ids=to(batch["pos"]),
                                image_positions=to(batch["img_pos"]) if img_feats is not None else None,
                                last_only=last_only)
    last = h[:, -1] if last_only else h[torch.arange(h.shape[0], device=device), to(batch["last"])]
    return last, kv


# ----------------------------------------------------------------------------- training path (autograd)
class PromptTooLong(ValueError):
    """group_logits: the prompt of (group, document) has `length` > max_length tokens (kept for the caller)."""

    def __init__(self, group: int, document: int, length: int, max_length: int):
        super().__init__(f"group {group} document {document}: prompt has {length} tokens > max_length={max_length}")
        self.group, self.document, self.length = group, document, length


def group_logits(model: Qwen25VL, processor: Processor, groups, yes_no=None, max_batch_tokens=None,
                 max_length=None, return_lengths=False):
    """[z_yes, z_no] (M, 2) fp32 for every document of every group, with autograd, for training.

    groups: list of (instruction, query, documents). All prefixes run as one left-padded batch (G, P); the
    documents, sorted by length, in batches of at most `max_batch_tokens` padded tokens (default: 2048 on a CPU,
    where small buffers are reused instead of page-faulted; unbounded on a GPU) on top of their own group's
    prefix keys/values (gathered per row). Sorting cuts the padding of one (M, longest) batch.
    A prompt longer than `max_length` tokens raises ValueError naming (group, document): nothing is truncated.
    return_lengths: also return the M full prompt lengths (list of int), e.g. for a tokens/s log."""
    bank = ImageBank(processor)
    parsed = [tokenize_group(processor, bank, *g) for g in groups]
    bank.preprocess()
    done = [finish_group(processor, bank, ins, *p) for (ins, _, _), p in zip(groups, parsed)]
    lengths = [len(d[0]) + len(c) for d in done for c in d[1]]  # (M,) group-major, as the output rows
    if max_length is not None:
        for g, d in enumerate(done):
            for j, c in enumerate(d[1]):
                if len(d[0]) + len(c) > max_length:
                    raise PromptTooLong(g, j, len(d[0]) + len(c), max_length)
    feats = bank.features(model)
    pad_id = processor.pad_id
    prefixes = pad_batch([d[0] for d in done], [p[2] for p in parsed], bank, model, pad_id)
    _, past = run_batch(model, prefixes, feats, last_only=True)
    starts = prefixes["pos"].amax(dim=(0, 2)) + 1  # (G,) next position after each prefix (host tensor)
    group = torch.tensor([g for g, d in enumerate(done) for _ in d[1]])  # (M,) group of each document
    docs, doc_imgs = [c for d in done for c in d[1]], [i for p in parsed for i in p[3]]
    device = model.head_weight.device
    if max_batch_tokens is None and device.type == "cpu":
        max_batch_tokens = 2048
    hs, order = [], []
    for b in length_batches([len(c) for c in docs], len(docs), max_batch_tokens):
        batch = pad_batch([docs[i] for i in b], [doc_imgs[i] for i in b], bank, model, pad_id,
                          start=starts[group[b]].tolist())
        gi = group[b].to(device)
        past_b = [(k[gi], v[gi]) for k, v in past]  # (B, KV, P, Dh): each document sees its own group's prefix
        h, _ = run_batch(model, batch, feats, past=past_b, past_mask=prefixes["mask"].to(device)[gi], last_only=True)
        hs.append(h)
        order += b
    h = torch.cat(hs)[torch.tensor(order).argsort().to(device)]  # (M, D) back in group-major document order
    yes_no = yes_no or (processor.token_id("yes"), processor.token_id("no"))
    z = yes_no_logits(h, model.head_rows(list(yes_no)))
    return (z, lengths) if return_lengths else z


# ----------------------------------------------------------------------------- inference
# A checkpoint folder may say which score it is read with: train.py writes {"score": "cl"} for an InfoNCE-trained
# model, whose "no" logit no loss ever constrained, so p(yes) would rank by noise (gmr.md §1.2: s_CL = z_yes).
SCORE_FILE = "minigmr_reranker.json"


def checkpoint_score(path: str) -> str:
    """The score a checkpoint folder asks for in SCORE_FILE: "sft" (p(yes)) or "cl" (z_yes); "sft" if absent."""
    file = os.path.join(path, SCORE_FILE)
    if not os.path.exists(file):
        return "sft"
    with open(file) as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e.msg}, line {e.lineno})") from None
    score = record.get("score") if isinstance(record, dict) else None
    if score not in ("sft", "cl"):
        raise ValueError(f"{file}: 'score' must be 'sft' or 'cl', got {score!r}")
    return score


class Reranker:
    def __init__(self, model: Qwen25VL, processor: Processor, batch_size: int = 16, padding_side: str = "left",
                 max_length: int | None = None, image_batch_patches: int | None = None,
                 pad_multiple: int | None = None, max_batch_tokens: int | None = None, score: str = "sft"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if score not in ("sft", "cl"):
            raise ValueError(f"score must be 'sft' (p(yes)) or 'cl' (the yes logit), got {score!r}")
        self.score_type = score
        self.model, self.processor = model.eval(), processor
        self.device = model.head_weight.device
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        cpu = self.device.type == "cpu"
        # Vision chunk (patches) and text batch (padded tokens) caps. On a CPU small ones are faster: glibc serves
        # buffers above 32 MB with fresh mmaps, and every fresh page costs a page fault (measured: a 4-block
        # 320-wide tower ran 25% faster on 4096-patch chunks than on 16384). On a GPU they only bound memory.
        self.image_batch_patches = image_batch_patches or (4096 if cpu else 16384)
        self.max_batch_tokens = max_batch_tokens or (2048 if cpu else None)
        # padded lengths rounded up on a GPU so compiled kernels / CUDA graphs see few distinct shapes
        self.pad_multiple = pad_multiple or (8 if self.device.type == "cuda" else 1)
        self.yes_id, self.no_id = processor.token_id("yes"), processor.token_id("no")

    @classmethod
    def from_pretrained(cls, path: str, adapter: str | None = None, dtype=None, device=None, min_pixels=None,
                        max_pixels=None, score: str | None = None, **kw) -> "Reranker":
        """Checkpoint directory (config.json, safetensors, tokenizer.json, preprocessor_config.json), optionally
        with a LoRA adapter directory (minigmr or peft format), merged into the weights for inference.
        score: "sft" or "cl"; default: what the checkpoint's SCORE_FILE says, else "sft"."""
        score = score or checkpoint_score(path)
        device, dtype = default_device_dtype(device, dtype)
        model = Qwen25VL.from_pretrained(path, dtype=dtype, device=device)
        if adapter is not None:
            from .lora import load_adapter, merge_lora
            load_adapter(model, adapter)
            merge_lora(model)
        return cls(model, Processor.from_pretrained(path, min_pixels, max_pixels), score=score, **kw)

    def score(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, batch_size=None) -> list:
        """One fp32 score per document: p(yes | instruction, query, document), the softmax over the yes/no logits
        (score="sft"), or the yes logit z_yes (score="cl", for models trained with InfoNCE)."""
        z = self.logits(query, documents, instruction, batch_size)
        return (sft_score(z) if self.score_type == "sft" else cl_score(z)).tolist()

    def rank(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, top_k=None, batch_size=None) -> list:
        """[(index, score)] sorted by score, best first (ties: lower index first); the first `top_k` only."""
        scores = self.score(query, documents, instruction, batch_size)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:top_k]]

    @torch.no_grad()
    def logits(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, batch_size=None) -> torch.Tensor:
        """(n, 2) fp32 [z_yes, z_no] at the last position of each (instruction, query, document) prompt."""
        proc, model, bank = self.processor, self.model, ImageBank(self.processor)
        q, docs, q_imgs, d_imgs = tokenize_group(proc, bank, instruction, query, documents)
        bank.preprocess()
        prefix, cands = finish_group(proc, bank, instruction, q, docs, q_imgs, d_imgs)
        if self.max_length is not None:
            for i, c in enumerate(cands):
                if len(prefix) + len(c) > self.max_length:
                    raise ValueError(f"document {i}: prompt has {len(prefix) + len(c)} tokens "
                                     f"> max_length={self.max_length}")
        feats = bank.features(model, self.image_batch_patches)  # vision tower once per distinct image
        head = model.head_rows([self.yes_id, self.no_id])  # (2, D)
        # host-side plan: length-sorted batches of candidates, everything padded and indexed in advance
        pre = pad_batch([prefix], [q_imgs], bank, model, proc.pad_id)
        start = int(pre["pos"].max()) + 1
        batches = length_batches([len(c) for c in cands], batch_size or self.batch_size, self.max_batch_tokens)
        plan = [(torch.tensor(b), pad_batch([cands[i] for i in b], [d_imgs[i] for i in b], bank, model, proc.pad_id,
                                            self.padding_side, start, self.pad_multiple))
                for b in batches]
        _, past = run_batch(model, pre, feats, last_only=True)  # the shared prefix, once
        past_mask = pre["mask"].to(self.device)
        out = torch.empty(len(cands), 2, device=self.device)
        left = self.padding_side == "left"
        for index, batch in plan:  # no host synchronisation in here
            h, _ = run_batch(model, batch, feats, past=past, past_mask=past_mask, last_only=left)
            out[index.to(self.device, non_blocking=True)] = yes_no_logits(h, head)
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
