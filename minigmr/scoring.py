"""The reranker: score = p(yes) from the yes/no logits at the last position, computed by a fused loop.

For one query and n candidate documents a plain implementation runs n full prompts through the model and
projects every position onto the whole vocabulary. The fused loop does the same maths with much less work:

  1. tokenize: every candidate's full prompt is tokenized as a whole (so ids are exactly the plain ones); the
     longest prefix common to all of them (system + instruction + query, incl. the query image) is the shared part;
  2. vision: each distinct image (query and documents) goes through the vision tower once;
  3. prefix: the shared part is encoded once; its keys/values are reused by every candidate batch;
  4. candidates: sorted by length and cut into batches of `batch_size` (little padding), left-padded, and run
     on top of the prefix keys/values; the last layer only computes the last position (`last_only`);
  5. head: only the last hidden state is projected, and only onto the "yes" and "no" rows of the LM head, in fp32.

All host-side work (tokens, padding, position ids, image-token indices) is done before the loop, so the loop has
no host synchronisation (no `.item()`, no branching on device values) and can run under CUDA graphs /
torch.compile. Weights are bf16 on a GPU and fp32 on a CPU; scores are always fp32.
`reference_logits` is the plain path, kept for the tests to compare against.
"""
import os

import numpy as np
import torch

from .decoder import rope_position_ids
from .losses import sft_score, yes_no_logits
from .model import Qwen25VL
from .processor import Processor
from .prompt import DEFAULT_INSTRUCTION, as_item, gmr_messages, query_messages


def default_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


class Reranker:
    def __init__(self, model: Qwen25VL, processor: Processor, batch_size: int = 16, padding_side: str = "left",
                 max_length: int | None = None, image_batch_patches: int = 16384, pad_multiple: int | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model, self.processor = model.eval(), processor
        self.device = model.head_weight.device
        self.batch_size, self.padding_side, self.max_length = batch_size, padding_side, max_length
        self.image_batch_patches = image_batch_patches  # vision tower chunk size, bounds its memory
        # padded lengths rounded up on a GPU so compiled kernels / CUDA graphs see few distinct shapes
        self.pad_multiple = pad_multiple or (8 if self.device.type == "cuda" else 1)
        self.yes_id, self.no_id = processor.token_id("yes"), processor.token_id("no")

    @classmethod
    def from_pretrained(cls, path: str, adapter: str | None = None, dtype=None, device=None, min_pixels=None,
                        max_pixels=None, **kw) -> "Reranker":
        """Checkpoint directory (config.json, safetensors, tokenizer.json, preprocessor_config.json), optionally
        with a LoRA adapter directory (minigmr or peft format), merged into the weights for inference."""
        device, dtype = default_device_dtype(device, dtype)
        model = Qwen25VL.from_pretrained(path, dtype=dtype, device=device)
        if adapter is not None:
            from .lora import load_adapter, merge_lora
            load_adapter(model, adapter)
            merge_lora(model)
        return cls(model, Processor.from_pretrained(path, min_pixels, max_pixels), **kw)

    # ------------------------------------------------------------------ public API
    def score(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, batch_size=None) -> list:
        """p(yes | instruction, query, document) for each document: softmax over the yes/no logits, fp32."""
        return sft_score(self.logits(query, documents, instruction, batch_size)).tolist()

    def rank(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, top_k=None, batch_size=None) -> list:
        """[(index, score)] sorted by score, best first (ties: lower index first); the first `top_k` only."""
        scores = self.score(query, documents, instruction, batch_size)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [(i, scores[i]) for i in order[:top_k]]

    @torch.no_grad()
    def logits(self, query, documents, instruction: str = DEFAULT_INSTRUCTION, batch_size=None) -> torch.Tensor:
        """(n, 2) fp32 [z_yes, z_no] at the last position of each (instruction, query, document) prompt."""
        if isinstance(documents, (str, dict)) or not len(documents):
            raise ValueError("documents must be a non-empty list")
        prefix, cands, cand_images, images = self._tokenize(instruction, query, documents)
        feats = self._image_features(images)  # one (tokens, D) tensor per distinct image
        q_imgs = [0] if as_item(query).image is not None else []
        past, start = self._encode_prefix(prefix, [feats[i] for i in q_imgs], [images[i][1] for i in q_imgs])
        batches = self._plan(cands, cand_images, images, start, batch_size or self.batch_size)
        head = self.model.head_rows([self.yes_id, self.no_id])  # (2, D)
        out = torch.empty(len(cands), 2, device=self.device)
        P = len(prefix)
        past_mask = torch.ones(1, P, dtype=torch.long, device=self.device)
        for b in batches:  # no host synchronisation in here
            to = lambda t: t.to(self.device, non_blocking=True)
            img_feats = torch.cat([feats[i] for i in b["images"]]) if b["images"] else None
            left = self.padding_side == "left"
            h, _ = self.model.hidden_states(
                to(b["ids"]), to(b["mask"]), image_features=img_feats, past=past, past_mask=past_mask,
                position_ids=to(b["pos"]), image_positions=to(b["img_pos"]) if img_feats is not None else None,
                last_only=left)
            last = h[:, -1] if left else h[torch.arange(h.shape[0], device=self.device), to(b["last"])]  # (B, D)
            out[to(b["index"])] = yes_no_logits(last, head)
        return out.cpu()

    # ------------------------------------------------------------------ steps
    def _tokenize(self, instruction, query, documents):
        """Token ids of the shared prefix and of each candidate's remainder, and the images each one needs."""
        q, docs = as_item(query), [as_item(d) for d in documents]
        images, key_of = [], {}  # distinct images, in first-seen order: (source, grid)

        def image_id(img):
            key = os.path.abspath(img) if isinstance(img, str) else id(img)
            if key not in key_of:
                key_of[key] = len(images)
                images.append([img, None])
            return key_of[key]

        q_imgs = [image_id(q.image)] if q.image is not None else []
        d_imgs = [[image_id(d.image)] if d.image is not None else [] for d in docs]
        if images:
            pixel_values, grids = self.processor.image_processor([im for im, _ in images])
            sizes = grids.prod(-1).tolist()
            for im, pv, g in zip(images, pixel_values.split(sizes), grids):
                im[0], im[1] = pv, g  # keep the preprocessed patches, not the image
        grid = lambda ids: [images[i][1].tolist() for i in ids]
        render = self.processor.render
        prefix_text = render(query_messages(instruction, q), add_generation_prompt=False)
        prefix_text = prefix_text[: -len("<|im_end|>\n")]
        prefix = np.array(self.processor.encode(prefix_text, grid(q_imgs)), dtype=np.int64)
        full = [self.processor.encode(render(gmr_messages(instruction, q, d)), grid(q_imgs + di))
                for d, di in zip(docs, d_imgs)]
        # shared length = the longest prefix that all candidates share with the prefix's own tokens (BPE may merge
        # the query's last characters with the "\n<Document>:" that follows, so it can be a token short)
        shared = len(prefix)
        for ids in full:
            n = min(len(ids) - 1, shared)
            diff = np.nonzero(np.asarray(ids[:n]) != prefix[:n])[0]
            shared = int(diff[0]) if len(diff) else n
        if self.max_length is not None:
            for i, ids in enumerate(full):
                if len(ids) > self.max_length:
                    raise ValueError(f"document {i}: prompt has {len(ids)} tokens > max_length={self.max_length}")
        if (prefix[shared:] == self.processor.image_pad_id).any():  # the differing tail is text after <|vision_end|>
            raise AssertionError("the shared prefix ends inside the query image")
        cands = [ids[shared:] for ids in full]
        return prefix[:shared].tolist(), cands, d_imgs, images

    def _image_features(self, images) -> list:
        """Vision tower once per distinct image, in chunks of at most `image_batch_patches` patches."""
        feats, chunk = [], []
        flush = lambda: feats.extend(self._vision(chunk)) or chunk.clear()
        for pv, g in images:
            if chunk and sum(c[0].shape[0] for c in chunk) + pv.shape[0] > self.image_batch_patches:
                flush()
            chunk.append((pv, g))
        if chunk:
            flush()
        return feats

    def _vision(self, chunk):
        pv = torch.cat([c[0] for c in chunk]).to(self.device)
        grids = torch.stack([c[1] for c in chunk])
        out = self.model.image_features(pv, grids)  # (sum tokens, D)
        return list(out.split((grids.prod(-1) // self.model.config.vision.spatial_merge_size ** 2).tolist()))

    def _encode_prefix(self, prefix, feats, grids):
        """Keys/values of the shared prefix (batch 1) and the position its continuation starts at."""
        ids = torch.tensor([prefix], dtype=torch.long)
        thw = torch.stack(grids) if grids else None
        pos = rope_position_ids(ids, None, thw, self.model.config.text, self.model.config.vision.spatial_merge_size)
        _, past = self.model.hidden_states(ids.to(self.device), image_features=torch.cat(feats) if feats else None,
                                           image_grid_thw=thw, position_ids=pos.to(self.device), last_only=True)
        return past, int(pos.max()) + 1

    def _plan(self, cands, cand_images, images, start, batch_size):
        """Host-side batches: length-sorted, padded ids/mask, 3-D position ids, image-token indices, the image
        features each batch needs (in order) and where its results go."""
        order = sorted(range(len(cands)), key=lambda i: -len(cands[i]))
        cfg, merge, pad_id = self.model.config.text, self.model.config.vision.spatial_merge_size, self.processor.pad_id
        batches = []
        for s in range(0, len(order), batch_size):
            index = order[s: s + batch_size]
            S = max(len(cands[i]) for i in index)
            S = -(-S // self.pad_multiple) * self.pad_multiple
            ids = torch.full((len(index), S), pad_id, dtype=torch.long)  # (B, S)
            mask = torch.zeros_like(ids)
            for r, i in enumerate(index):
                cols = slice(S - len(cands[i]), S) if self.padding_side == "left" else slice(0, len(cands[i]))
                ids[r, cols], mask[r, cols] = torch.tensor(cands[i]), 1
            imgs = [j for i in index for j in cand_images[i]]
            thw = torch.stack([images[j][1] for j in imgs]) if imgs else None
            batches.append(dict(
                index=torch.tensor(index), ids=ids, mask=mask, images=imgs, last=mask.sum(-1) - 1,
                pos=rope_position_ids(ids, mask, thw, cfg, merge, start=start),  # (3, B, S)
                img_pos=torch.nonzero((ids == cfg.image_token_id).flatten()).flatten()))
        return batches


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
