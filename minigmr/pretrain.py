"""Caption pretraining: how the synthetic world's tiny checkpoint becomes a (tiny) vision-language model.

GMR starts from Qwen2.5-VL-Instruct, a model that already *sees*: its pretraining tied image patches to words long
before anyone asked it "yes" or "no". One yes/no bit per document is a poor teacher of that grounding (SFT from
random init learns the world's text tasks but not to bind "two" / "red" / "on the left" to pixels); captioning
gives several supervised words per picture. Each example is one Qwen-chat exchange (default system prompt, user =
one picture, assistant = its text) with the next-token loss on the answer only, as in instruction tuning:

    scene picture -> its description            "two red circles on the left and one blue star on the right"
    page screenshot -> the passage printed on it "note 12. the picture shows two red circles on the left."

Pages (`p_page`) are off by default: they did not help the reranker trained on top (docs/experiments.md). The model
never sees the reranking prompt, a query/document pair or "yes"/"no" as answers, so the checkpoint is still an
untrained *reranker* (world.json "pretraining" records what it did learn) and whatever it gains in train.py is
learned there. Everything is a pure function of the seed (str-seeded pictures, batches in a fixed order, AdamW from
the same init); on one machine with one thread count the weights are bit-identical.
"""
import math
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import Qwen25VL
from .processor import Processor
from .scenes import ALL_GROUPS, OPPOSITE, TEMPLATES, VALUES, Group, describe, draw_page, draw_scene, fields

# Attribute -> which answer tokens of a one-group description name it ("two red circles on the left": every word
# of the world is one token, so these are token indices in the answer).
ATTRIBUTE_TOKENS = {"count": (0,), "colour": (1,), "shape": (2,), "position": (3, 4, 5)}


def caption_example(rng: random.Random, p_page: float = 0.0, p_two: float = 0.3):
    """(picture, answer text, groups): a scene with one group (or two on opposite sides) described, or the same
    as a page screenshot with one of the world's passage templates printed on it."""
    g = rng.choice(ALL_GROUPS)
    groups = [g]
    if g.position in OPPOSITE and rng.random() < p_two:
        groups.append(Group(rng.choice(VALUES["count"]), rng.choice(VALUES["colour"]), rng.choice(VALUES["shape"]),
                            OPPOSITE[g.position]))
    if rng.random() < p_page:
        text = rng.choice(TEMPLATES["passage"]).format(**fields(groups, rng.randint(1, 99)))
        return draw_page(text, rng), text, groups
    return draw_scene(groups, rng), describe(groups), groups


def caption_batch(processor: Processor, examples):
    """Right-padded chat batch of (picture -> answer) turns and its labels (B, S-1): the next token at every
    answer position (the answer's words and its <|im_end|>), -100 elsewhere."""
    convs = [[{"role": "user", "content": [{"type": "image", "image": im}]}, {"role": "assistant", "content": text}]
             for im, text, _ in examples]
    batch = processor.apply_chat(convs, add_generation_prompt=False, padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, S)
    assistant = processor.token_id("assistant")
    labels = torch.full_like(ids[:, 1:], -100)  # (B, S-1): labels[:, t] is the token after position t
    for b in range(ids.shape[0]):
        start = int((ids[b] == assistant).nonzero()[-1]) + 1  # the "\n" after "assistant" predicts the 1st word
        end = int(mask[b].sum()) - 1  # ... up to the <|im_end|>; its trailing "\n" is not predicted
        labels[b, start:end - 1] = ids[b, start + 1:end]
    return batch, labels


def answer_logits(model: Qwen25VL, batch, labels) -> torch.Tensor:
    """fp32 logits (n, V) at the answer positions only (labels != -100): the full (B, S, V) is never built."""
    dev = model.head_weight.device
    h, _ = model.hidden_states(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                               batch["pixel_values"].to(dev), batch["image_grid_thw"].to(dev))  # (B, S, D)
    keep = (labels != -100).to(dev)  # (B, S-1)
    return (h[:, :-1][keep] @ model.head_weight.T).float()  # (n, V)


@torch.no_grad()
def caption_accuracy(model: Qwen25VL, processor: Processor, seed: int = 0, n: int = 96) -> dict:
    """Teacher-forced accuracy of the greedy next token on held-out one-group scene descriptions, per attribute
    (chance: count 1/4, colour 1/6, shape 1/6, position 1/5): the grounding train.py's reranker builds on."""
    rng = random.Random(f"{seed}/pretrain/heldout")
    examples = [caption_example(rng, p_page=0.0, p_two=0.0) for _ in range(n)]
    was_training = model.training
    model.eval()
    batch, labels = caption_batch(processor, examples)
    pred = answer_logits(model, batch, labels).argmax(-1)  # (n_answer_tokens,) in row-major (b, t) order
    right = (pred.cpu() == labels[labels != -100]).split((labels != -100).sum(1).tolist())  # per example
    model.train(was_training)
    return {attr: round(sum(bool(r[list(idx)].all()) for r in right) / n, 3)
            for attr, idx in ATTRIBUTE_TOKENS.items()}


def pretrain(model: Qwen25VL, processor: Processor, steps: int, seed: int = 0, batch_size: int = 16,
             lr: float = 1e-3, warmup: int = 50, p_page: float = 0.0, progress: bool = True) -> list:
    """Caption-pretrain every weight of `model` in place for `steps` AdamW steps (linear warmup, cosine to 0,
    gradient clipping at 1.0); returns the per-step losses. In the model's dtype on the model's device (synth: fp32,
    CPU)."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"caption pretraining needs steps >= 1 and batch_size >= 1, got {steps} and {batch_size}")
    rng = random.Random(f"{seed}/pretrain")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    history = []
    for step in tqdm(range(steps), desc="caption pretraining", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch, labels = caption_batch(processor, [caption_example(rng, p_page) for _ in range(batch_size)])
        loss = F.cross_entropy(answer_logits(model, batch, labels), labels[labels != -100].to(model.head_weight.device))
        history.append(optimizer_step(model, opt, loss, "caption pretraining", step))
    model.eval()
    return history


def optimizer_step(model, opt, loss, what: str, step: int) -> float:
    """Backward, clip the gradient norm at 1, step; a non-finite loss stops `what` at `step` before any update."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{what}: non-finite loss {loss.item()} at step {step}")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()
