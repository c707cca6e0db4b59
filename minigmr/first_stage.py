"""The synthetic world's first stage: an embedder trained on the world's own training data, and its retrieval.

MRB reranks the top 100 of GME-2B, a Qwen2-VL embedder (docs/gmr.md §4, §8); the world does the same at its scale:
the caption-pretrained tiny checkpoint is trained into an embedder (embedding.py: the last state of E5-V's "in one
word" prompt) with the VladVA objective (losses.embedding_infonce_loss over the batch, plus the next-token loss on
the records' descriptions), then every dataset's corpus is embedded once and each query's top `n_candidates` by
cosine similarity become its run.trec, which the reranker then reorders.

The loop is a plain one, as pretrain.py's (AdamW on every weight, warm-up then cosine, clipping at 1.0, a pure
function of the seed); the forward and the loss are train.py --objective embed's (embedding.GroupEmbedder,
losses.py), which adds LoRA, DDP, resume and checkpoints for real models.
"""
import math
import os
import shutil

import torch
from tqdm import tqdm

from .data import load_dataset
from .embedding import Embedder, GroupEmbedder, mark_embedder, search
from .losses import embedding_infonce_loss, next_token_loss
from .metrics import write_run
from .model import Qwen25VL
from .pretrain import optimizer_step
from .processor import Processor
from .train_data import GlobalBatches, load_training_data

# The world embedder's recipe (what it reaches and costs: docs/experiments.md, The learned first stage).
EMBED_BATCH, EMBED_NEGATIVES, EMBED_HARD_RATIO = 16, 3, 0.67  # groups per step; negatives per group, 2 of 3 hard
EMBED_LR, EMBED_TEMPERATURE, EMBED_LM_WEIGHT = 5e-4, 0.05, 1.0
PROCESSOR_FILES = ("tokenizer.json", "preprocessor_config.json")


def train_embedder(model: Qwen25VL, processor: Processor, train_jsonl: str, steps: int, seed: int = 0,
                   batch: int = EMBED_BATCH, lr: float = EMBED_LR, temperature: float = EMBED_TEMPERATURE,
                   lm_weight: float = EMBED_LM_WEIGHT, progress: bool = True) -> list:
    """Train every weight of `model` in place for `steps` AdamW steps on the training JSONL; returns the per-step
    losses. Batches are train_data.GlobalBatches (a pure function of (seed, step))."""
    if steps < 1 or batch < 1:
        raise ValueError(f"embedder training needs steps >= 1 and batch >= 1, got {steps} and {batch}")
    batches = GlobalBatches(load_training_data(train_jsonl), batch, EMBED_NEGATIVES, EMBED_HARD_RATIO, seed)
    forward = GroupEmbedder(model, processor, descriptions=lm_weight > 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup, history = max(1, round(0.05 * steps)), []
    model.train()
    for step in tqdm(range(steps), desc="embedder training", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        (q, d, positive, exclude, lm), _ = forward(batches.at(step))
        loss = embedding_infonce_loss(q, d, positive, temperature, exclude)
        if lm is not None:
            loss = loss + lm_weight * next_token_loss(*lm)
        history.append(optimizer_step(model, opt, loss, "embedder training", step))
    model.eval()
    return history


def save_embedder(model: Qwen25VL, checkpoint_dir: str, out: str) -> str:
    """The embedder in the official layout with the checkpoint's processor files, marked as an embedder."""
    model.save_pretrained(out)
    for name in PROCESSOR_FILES:
        shutil.copy(os.path.join(checkpoint_dir, name), os.path.join(out, name))
    mark_embedder(out)
    return out


def retrieve(embedder: Embedder, ds, k: int) -> dict:
    """{qid: {docid: cosine}} of a Dataset: its corpus embedded once (no instruction), its queries with the
    dataset's instruction, each query's exact top k (trec_eval order, embedding.search)."""
    ids = list(ds.corpus)
    corpus = embedder.embed([ds.corpus[d].as_input() for d in ids])
    queries = embedder.embed([q.as_input() for q in ds.queries.values()], ds.instruction)
    return dict(zip(ds.queries, search(queries, corpus, ids, k)))


def write_first_stage(embedder: Embedder, dataset_dir: str, k: int, tag: str = "synth-embedder") -> dict:
    """Replace a written dataset's run.trec by the embedder's top k (the formula's run stays in
    run.attributes.trec, for the ablation) and return the new run. Run again after an interruption, it redoes the
    same work: the formula's run is moved aside only once."""
    ds = load_dataset(dataset_dir)
    run = retrieve(embedder, ds, k)
    if not os.path.exists(attributes := os.path.join(dataset_dir, "run.attributes.trec")):
        os.replace(os.path.join(dataset_dir, "run.trec"), attributes)
    write_run(os.path.join(dataset_dir, "run.trec"), run, tag)
    return run


def build_first_stage(checkpoint: str, train_jsonl: str, out: str, dataset_dirs: list, k: int, steps: int,
                      seed: int = 0) -> dict:
    """The world's first stage: the checkpoint trained into an embedder for `steps` AdamW steps (0: untrained),
    saved to `out`, then each dataset's run.trec replaced by its top k. Returns what world.json records of it."""
    model, processor = Qwen25VL.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint)
    with torch.random.fork_rng(devices=[]):  # a pure function of the seed, whatever ran before in this process
        torch.manual_seed(seed)
        losses = train_embedder(model, processor, train_jsonl, steps, seed) if steps else []
    save_embedder(model, checkpoint, out)
    for dataset_dir in dataset_dirs:
        write_first_stage(Embedder(model, processor), dataset_dir, k)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None
    return {"embed_steps": steps, "embedder": {"loss_first_20": mean(losses[:20]), "loss_last_20": mean(losses[-20:])}}

