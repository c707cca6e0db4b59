"""A seeded, procedural synthetic world, so that minigmr trains and evaluates on a fresh machine with no download.

    python -m minigmr.synth --out data/synth --seed 0

From the scenes of scenes.py (groups of coloured shapes, drawn, described in words and printed on pages) we build:
  (a) an evaluation suite, one dataset per MRB task type (docs/gmr.md §4);
  (b) training data (JSONL: query, positives, negatives, hard_negatives, a longer description of the positive)
      from a disjoint sample of the same world;
  (c) a tiny Qwen2.5-VL checkpoint in the official layout, with a BPE tokenizer trained on the world, random-init
      and then caption-pretrained on the world's pictures (pretrain.py; it never sees a yes/no answer);
  (d) the suite's first stage, as MRB's is GME's top 100: that checkpoint trained into an embedder on (b)
      (first_stage.py; saved in embedder/), whose top `n_candidates` per query are each run.trec. The ablation
      --first-stage attributes keeps a formula instead (the true attributes' overlap + noise, which no real
      retriever has); with the embedder it is kept in run.attributes.trec for comparison.
Retrieval is not trivial: each query's hard negatives differ from its positive in exactly one attribute, and some
queries also have a grade-1 "partial" document that shows the target group plus a second, different group.
Everything is a pure function of the seed (str-seeded random.Random streams, which Python hashes with SHA-512
independently of PYTHONHASHSEED); trained weights are byte-identical on the same CPU type only (one thread, README).
"""
import argparse
import itertools
import json
import os
import random
import shutil

import torch

from .config import Config, TextConfig, VisionConfig
from .data import Item, read_json, write_dataset, write_json
from .first_stage import build_first_stage
from .hardware import pinned_threads
from .metrics import rank
from .model import Qwen25VL
from .pretrain import caption_accuracy, pretrain
from .processor import DEFAULT_SYSTEM_PROMPT, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Processor
from .prompt import DEFAULT_INSTRUCTION, SYSTEM_PROMPT
from .scenes import (ALL_GROUPS, ATTRIBUTES, EDITS, OPPOSITE, TEMPLATES, VALUES, Group, draw_page, draw_scene,
                     fields, grade, mutate, picture_saver)
from .tokenizer import train_bpe_tokenizer

TASKS = {  # dataset: (MRB task type, query kind, document kind, instruction in GME/MTEB style, docs/gmr.md §1.4)
    "synth_t2t": ("T->T", "question", "passage", "Given a question, retrieve passages that answer the question."),
    "synth_i2i": ("I->I", "image", "image", "Find an image that shows the same objects as the given image."),
    "synth_t2i": ("T->I", "caption", "image", "Find an image that matches the given caption."),
    "synth_t2vd": ("T->VD", "question", "page", "Find a screenshot that relevant to the user's question."),
    "synth_i2t": ("I->T", "image", "caption", "Find an image caption describing the given image."),
    "synth_t2it": ("T->IT", "caption", "image+title", "Find a picture with a title that matches the given caption."),
    "synth_it2t": ("IT->T", "image+question", "passage", "Find the passage that answers the question about the image."),
    "synth_it2i": ("IT->I", "image+edit", "image",
                   "Retrieve an image that aligns with the modification instructions of the provided image."),
    "synth_it2it": ("IT->IT", "image+ask", "image+passage", "Find the card whose picture and text match the query."),
}
# The ablation's first stage (first_stage="attributes"): weighted overlap of the true attributes + Gaussian noise,
# good at colour and shape and weak at counting and position.
RETRIEVER_WEIGHTS = {"count": 0.4, "colour": 1.0, "shape": 1.0, "position": 0.6}
RETRIEVER_NOISE = 0.6
# Init std of the tiny checkpoint's matrices, above transformers' 0.02 (why: write_tiny_checkpoint).
INIT_STD = 0.07
# Caption-pretraining steps of the tiny checkpoint: enough grounding for the demo's reranker to learn on
# (what it reaches: world.json "pretraining"; measurements: docs/experiments.md).
PRETRAIN_STEPS = 2000
N_HARD, N_DISTRACTORS = 8, 3  # per eval query: hard negatives, and random distractor documents in the corpus
# Bumped whenever generation changes, so that an old world on disk is not silently reused (ensure_world).
WORLD_VERSION = 5
# Steps of the world's first-stage embedder (first_stage.py; what it reaches: docs/experiments.md).
EMBED_STEPS = 250
# Strings of the GMR prompt (docs/gmr.md §1.3) and the Qwen chat format, so the tokenizer learns them too.
PROMPT_STRINGS = (SYSTEM_PROMPT, DEFAULT_SYSTEM_PROMPT, DEFAULT_INSTRUCTION, "<Instruct>: ", "<Query>:",
                  "\n<Document>:", "system", "user", "assistant", "yes", "no")


# ---------------------------------------------------------------------------------------------------- task builders
def render(kind: str, item: dict, rng, picture, variant) -> dict:
    """One query or document of a given kind as {"text"?, "image"?}. `variant` picks one of the renderings."""
    groups, out = item["groups"], {}
    f = fields(groups, rng.randint(1, 99))
    if kind == "page":
        draw = lambda r: draw_page(r.choice(TEMPLATES["passage"]).format(**fields(groups, r.randint(1, 99))), r)
        out["image"] = picture(f"page/{groups}/{variant}", draw)
    elif kind.startswith("image"):
        shown = item.get("ref", groups)  # IT->I queries show the reference image, not the target
        out["image"] = picture(f"scene/{shown}/{variant}", lambda r: draw_scene(shown, r))
    if kind == "image+edit":
        out["text"] = EDITS[item["edit"]].format(**f)
    elif kind in TEMPLATES:
        out["text"] = rng.choice(TEMPLATES[kind]).format(**f)
    return out


def make_example(qkind: str, target: Group, rng, n_hard: int, p_partial: float) -> dict:
    """Attribute records of one query: the query, its exact positive, maybe a partial one, and `n_hard` distinct
    hard negatives that each change one attribute (spread over all four)."""
    query, hard = {"groups": [target]}, []
    if qkind == "image+edit":  # composed retrieval (CIRR-like): the reference image is itself a hard negative
        attr = rng.choice(ATTRIBUTES)
        query.update(ref=[mutate(target, attr, rng)], edit=attr)
        hard.append(query["ref"][0])
    if n_hard > sum(len(v) - 1 for v in VALUES.values()):
        raise ValueError(f"n_hard={n_hard} exceeds the number of single-attribute changes of a group")
    order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
    for attr in itertools.cycle(order):
        if len(hard) >= n_hard:
            break
        options = [v for v in VALUES[attr] if v != getattr(target, attr) and target._replace(**{attr: v}) not in hard]
        if options:
            hard.append(target._replace(**{attr: rng.choice(options)}))
    positives = [[target]]
    if target.position in OPPOSITE and rng.random() < p_partial:
        extra = Group(rng.choice(VALUES["count"]), mutate(target, "colour", rng).colour,
                      mutate(target, "shape", rng).shape, OPPOSITE[target.position])
        positives.append([target, extra])
    return {"query": query, "positives": positives, "hard": [[g] for g in hard]}


def retriever_score(target: Group, groups: list, rng) -> float:
    overlap = max(sum(RETRIEVER_WEIGHTS[a] for a in ATTRIBUTES if getattr(g, a) == getattr(target, a)) for g in groups)
    return round(overlap + rng.gauss(0.0, RETRIEVER_NOISE), 4)


def check_sizes(n_queries: int, n_candidates: int, n_train: int = 1) -> None:
    """ValueError naming the argument (and its command-line flag) when a world of these sizes cannot be built:
    each dataset draws N_DISTRACTORS documents per query from ALL_GROUPS without replacement, and its corpus
    holds at least (1 + N_HARD + N_DISTRACTORS) documents per query."""
    smallest_corpus = n_queries * (1 + N_HARD + N_DISTRACTORS)
    for name, flag, value, top in (("n_queries", "--eval-queries", n_queries, len(ALL_GROUPS) // N_DISTRACTORS),
                                   ("n_candidates", "--candidates", n_candidates, smallest_corpus),
                                   ("n_train", "--train", n_train, None)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (top and value > top):
            raise ValueError(f"{name} ({flag}) must be an integer in 1..{top or 'any'}, got {value!r}"
                             + (" (the smallest corpus at this many eval queries)" if name == "n_candidates" else ""))


def write_eval_dataset(folder: str, name: str, seed: int = 0, n_queries: int = 24, n_candidates: int = 30,
                       n_hard: int = N_HARD, p_partial: float = 0.4) -> dict:
    """Build one dataset of the suite, write it to `folder` and return it with its attribute records
    ({"queries": [{"id", "groups", ...}], "docs": [{"id", "groups"}], "qrels", "run"}) for inspection and tests."""
    check_sizes(n_queries, n_candidates)
    task, qkind, dkind, instruction = TASKS[name]
    rng = random.Random(f"{seed}/eval/{name}")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    picture = picture_saver(folder, f"{seed}/eval/{name}")
    queries, docs = [], []
    for i, target in enumerate(rng.sample(ALL_GROUPS, n_queries)):
        ex = make_example(qkind, target, rng, n_hard, p_partial)
        queries.append({"id": f"q{i + 1:04d}", **ex["query"]})
        docs += [{"groups": g} for g in ex["positives"] + ex["hard"]]
    docs += [{"groups": [g]} for g in rng.sample(ALL_GROUPS, N_DISTRACTORS * n_queries)]  # random distractors
    if len(docs) < n_candidates:
        raise ValueError(f"{name}: corpus of {len(docs)} documents is smaller than n_candidates={n_candidates}")
    rng.shuffle(docs)  # so that doc ids say nothing about relevance
    for i, d in enumerate(docs):
        d["id"] = f"d{i + 1:04d}"
    qrels, run = {}, {}
    for q in queries:
        target = q["groups"][0]
        qrels[q["id"]] = {d["id"]: grade(target, d["groups"]) for d in docs if grade(target, d["groups"])}
        scores = {d["id"]: retriever_score(target, d["groups"], rng) for d in docs}
        run[q["id"]] = {did: scores[did] for did in rank(scores)[:n_candidates]}  # top-k in trec_eval order
    items = {}
    for role, records, kind in (("queries", queries, qkind), ("corpus", docs, dkind)):
        rendered = (render(kind, r, rng, picture, rng.randrange(10 ** 6)) for r in records)
        items[role] = [Item(r["id"], x.get("text"), x.get("image")) for r, x in zip(records, rendered)]
    meta = {"name": name, "task": task, "instruction": instruction, "main_metric": "ndcg@10",
            "source": f"minigmr.synth seed={seed}"}
    write_dataset(folder, **meta, queries=items["queries"], corpus=items["corpus"], qrels=qrels, run=run,
                  run_tag="synth-retriever")  # also loads the folder back, which validates it
    return {"meta": meta, "queries": queries, "docs": docs, "qrels": qrels, "run": run}


def write_eval_suite(suite_dir: str, seed: int = 0, n_queries: int = 24, n_candidates: int = 30) -> dict:
    """All nine datasets under suite_dir/<name>/; returns {name: dataset} as write_eval_dataset does."""
    return {name: write_eval_dataset(os.path.join(suite_dir, name), name, seed, n_queries, n_candidates)
            for name in TASKS}


def write_training_data(folder: str, seed: int = 0, n_records: int = 3000, exclude=(), n_hard: int = 6,
                        n_neg: int = 6) -> list:
    """folder/train.jsonl (+ folder/images/): the nine task types mixed in equal shares. Query targets in
    `exclude` (the eval queries' targets) are never used. Pictures come from a small shared pool (3 renderings per
    group and kind; queries use rendering 0, documents 1 or 2) so thousands of records stay quick to write.
    Returns the attribute records [{"task", "query", "positives", "hard", "negatives"}] in file order."""
    if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
        raise ValueError(f"n_records (--train) must be a positive integer, got {n_records!r}")
    exclude = set(exclude)
    allowed = [g for g in ALL_GROUPS if g not in exclude]
    if not allowed:
        raise ValueError("every group is an eval query target, so no training query is left; use fewer eval queries")
    rng = random.Random(f"{seed}/train")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    picture = picture_saver(folder, f"{seed}/train")
    names = [list(TASKS)[i % len(TASKS)] for i in range(n_records)]
    rng.shuffle(names)
    records, plain = [], lambda x: x if "image" in x else x["text"]  # text-only items as bare strings, as allowed
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i, name in enumerate(names):
            _, qkind, dkind, instruction = TASKS[name]
            target = rng.choice(allowed)
            ex = make_example(qkind, target, rng, n_hard, p_partial=0.0)
            ex["negatives"] = []
            while len(ex["negatives"]) < n_neg:  # random negatives: at least two attributes away from the target
                g = rng.choice(ALL_GROUPS)
                if sum(a != b for a, b in zip(g, target)) >= 2 and [g] not in ex["negatives"]:
                    ex["negatives"].append([g])
            records.append({"task": TASKS[name][0], **ex})
            doc = lambda groups: plain(render(dkind, {"groups": groups}, rng, picture, rng.choice((1, 2))))
            about = random.Random(f"{seed}/train/description/{i}")  # its own stream: the rest is unchanged
            description = about.choice(TEMPLATES["passage"]).format(**fields(ex["positives"][0], about.randint(1, 99)))
            f.write(json.dumps({"id": f"train-{i:05d}", "instruction": instruction,
                                "query": plain(render(qkind, ex["query"], rng, picture, 0)),
                                "positives": [doc(g) for g in ex["positives"]],
                                "negatives": [doc(g) for g in ex["negatives"]],
                                "hard_negatives": [doc(g) for g in ex["hard"]],
                                "description": description}) + "\n")
    return records


# ---------------------------------------------------------------------------------------------------- checkpoint
def world_texts() -> list:
    """Everything the tokenizer should know: every template filled for every group, instructions, prompt strings."""
    texts = list(PROMPT_STRINGS) + [t[3] for t in TASKS.values()] + [f"page {n}" for n in range(100)]
    for g in ALL_GROUPS:
        f = fields([g], 0)
        texts += [t.format(**f) for ts in TEMPLATES.values() for t in ts] + [t.format(**f) for t in EDITS.values()]
    return texts


def write_tiny_checkpoint(folder: str, seed: int = 0, tokenizer_vocab: int = 600, pretrain_steps: int = 0) -> dict:
    """config.json + model.safetensors, tokenizer.json and preprocessor_config.json, all in the official
    Qwen2.5-VL layout, sized to train in minutes on a CPU: random init, then `pretrain_steps` of caption
    pretraining (pretrain.py; 0 leaves it random). Returns the pretraining record for world.json. The vocabulary is
    small enough that every word of the world is one token (and large enough that train_bpe_tokenizer can keep
    "yes"/"no" whole)."""
    os.makedirs(folder, exist_ok=True)
    tok = train_bpe_tokenizer(world_texts(), tokenizer_vocab)
    tok.save(os.path.join(folder, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                           "<|vision_start|>", "<|vision_end|>")}
    text = TextConfig(vocab_size=-(-tok.get_vocab_size() // 64) * 64, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6],
                      max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                      image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                          window_size=112, fullatt_block_indexes=[1, 3])
    write_json(os.path.join(folder, "preprocessor_config.json"), {  # as transformers' Qwen2VLImageProcessor saves it
        "min_pixels": 4 * 28 * 28, "max_pixels": 64 * 28 * 28, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "resample": 3,
        "rescale_factor": 1 / 255,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"})
    record = {"steps": pretrain_steps}
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(seed)
        model = Qwen25VL(Config(text, vision, dtype="float32"))
        # Re-init every matrix with N(0, INIT_STD) instead of transformers' 0.02: at 0.02 and width 128 attention
        # starts uniform and the model sits long on the constant-guess plateau before it learns to match.
        with torch.no_grad():
            for w in model.parameters():
                if w.dim() >= 2:
                    w.normal_(0.0, INIT_STD)
        if pretrain_steps:
            processor = Processor.from_pretrained(folder)
            losses = pretrain(model, processor, pretrain_steps, seed)
            mean = lambda xs: round(sum(xs) / len(xs), 4)
            record.update(loss_first_100=mean(losses[:100]), loss_last_100=mean(losses[-100:]),
                          caption_accuracy=caption_accuracy(model, processor, seed))
    model.save_pretrained(folder)  # writes config.json (official flat format) + model.safetensors
    return record


# ---------------------------------------------------------------------------------------------------- the whole world
@pinned_threads(1)  # trained weights that do not depend on the machine's core count (hardware.pinned_threads)
def generate_world(out_dir: str, seed: int = 0, n_eval_queries: int = 24, n_candidates: int = 30,
                   n_train: int = 3000, pretrain_steps: int = PRETRAIN_STEPS, first_stage: str = "embedder",
                   embed_steps: int = EMBED_STEPS, stage: str = "all") -> dict:
    """Write suite/, train/train.jsonl, checkpoint/, embedder/ (the embedder first stage; embed_steps=0: untrained)
    and world.json under out_dir. stage="base" stops before the first stage (world.json's first_stage null;
    complete_world adds it), so that a reranker can train on the checkpoint while the embedder does (demo.sh)."""
    check_sizes(n_eval_queries, n_candidates, n_train)
    if first_stage not in ("embedder", "attributes") or stage not in ("base", "all"):
        raise ValueError(f"first_stage (--first-stage) must be 'embedder' or 'attributes' and stage (--stage) 'base' "
                         f"or 'all', got {first_stage!r} and {stage!r}")
    suite = write_eval_suite(os.path.join(out_dir, "suite"), seed, n_eval_queries, n_candidates)
    eval_targets = {q["groups"][0] for ds in suite.values() for q in ds["queries"]}
    write_training_data(os.path.join(out_dir, "train"), seed, n_train, exclude=eval_targets)
    pretraining = write_tiny_checkpoint(os.path.join(out_dir, "checkpoint"), seed, pretrain_steps=pretrain_steps)
    write_json(os.path.join(out_dir, "world.json"), {
        "version": WORLD_VERSION, "seed": seed, "n_eval_queries": n_eval_queries, "n_candidates": n_candidates,
        "n_train": n_train, "pretrain_steps": pretrain_steps, "pretraining": pretraining, "first_stage": None})
    return complete_world(out_dir, first_stage, embed_steps) if stage == "all" else world_paths(out_dir)


@pinned_threads(1)
def complete_world(out_dir: str, first_stage: str = "embedder", embed_steps: int = EMBED_STEPS) -> dict:
    """Add the first stage to a base world in place; world.json, rewritten last, then says so. Interrupted, it
    can run again. The files equal generate_world(stage="all")'s byte for byte."""
    manifest = os.path.join(out_dir, "world.json")
    world, paths = read_json(manifest), world_paths(out_dir)
    if first_stage not in ("embedder", "attributes") or world.get("first_stage") is not None:
        raise ValueError(f"{manifest}: first_stage must be 'embedder' or 'attributes' (got {first_stage!r}) and the "
                         f"world must not have one yet (it already has: {world.get('first_stage')})")
    world["first_stage"] = first_stage
    if first_stage == "embedder":
        world.update(build_first_stage(paths["checkpoint"], paths["train"], paths["embedder"],
                                       [os.path.join(paths["suite"], name) for name in TASKS],
                                       world["n_candidates"], embed_steps, world["seed"]))
    write_json(manifest, world)
    return paths


def world_paths(out_dir: str) -> dict:
    return {"root": out_dir, "suite": os.path.join(out_dir, "suite"),
            "train": os.path.join(out_dir, "train", "train.jsonl"), "checkpoint": os.path.join(out_dir, "checkpoint"),
            "embedder": os.path.join(out_dir, "embedder")}


def ensure_world(out_dir: str, seed: int = 0, stage: str = "all", **kwargs) -> dict:
    """The world at out_dir, generated first if absent (a base world is completed in place, stage="all").
    Generation goes to a temporary sibling folder that is renamed into place only when complete, so an interrupted
    run never leaves a half-written world behind."""
    manifest = os.path.join(out_dir, "world.json")
    if os.path.exists(manifest):
        have = read_json(manifest)
        if not isinstance(have, dict):
            raise ValueError(f"{manifest}: expected a JSON object (the world's settings); delete the folder to "
                             "generate it again")
        base = have.get("first_stage") is None  # a base world: its first-stage settings are not chosen yet
        want = {"version": WORLD_VERSION, "seed": seed, **kwargs}
        wrong = {k: (have.get(k), v) for k, v in want.items()
                 if have.get(k) != v and not (base and k in ("first_stage", "embed_steps"))}
        if wrong:
            raise ValueError(f"{out_dir} holds a world made with other settings (setting: (there, asked)): {wrong}; "
                             "delete the folder to generate it again")
        if base and stage == "all":
            complete_world(out_dir, kwargs.get("first_stage", "embedder"), kwargs.get("embed_steps", EMBED_STEPS))
        return world_paths(out_dir)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} exists, is not empty and has no world.json: not a minigmr synthetic world")
    tmp = f"{out_dir.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        generate_world(tmp, seed, stage=stage, **kwargs)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    except OSError:
        if not os.path.exists(manifest):  # not a concurrent writer that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return world_paths(out_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate minigmr's synthetic world: eval suite, training data and a "
                                            "tiny caption-pretrained checkpoint.")
    p.add_argument("--out", required=True,
                   help="output folder; generated if absent, reused if it holds a world made with these settings")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed; the same seed gives byte-identical files (default: %(default)s)")
    p.add_argument("--eval-queries", type=int, default=24,
                   help="queries per eval dataset, nine datasets (default: %(default)s)")
    p.add_argument("--candidates", type=int, default=30,
                   help="first-stage candidates per query in run.trec (default: %(default)s)")
    p.add_argument("--train", type=int, default=3000, help="number of training records (default: %(default)s)")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                   help="caption-pretraining steps of the tiny checkpoint; 0: random init (default: %(default)s)")
    p.add_argument("--first-stage", choices=("embedder", "attributes"), default="embedder",
                   help="embedder: the checkpoint trained into an embedder on the training data retrieves each "
                        "run.trec; attributes: the ablation, a formula over the true attributes + noise")
    p.add_argument("--embed-steps", type=int, default=EMBED_STEPS,
                   help="the first-stage embedder's training steps; 0: the checkpoint untrained (default: %(default)s)")
    p.add_argument("--stage", choices=("base", "all"), default="all",
                   help="base: the suite, training data and checkpoint only; a later run with all (the default) adds "
                        "the first stage in place")
    a = p.parse_args(argv)
    if a.pretrain_steps < 0 or a.embed_steps < 0:
        p.error(f"--pretrain-steps and --embed-steps must be >= 0, got {a.pretrain_steps} and {a.embed_steps}")
    try:
        check_sizes(a.eval_queries, a.candidates, a.train)
    except ValueError as e:
        p.error(str(e))
    extra = {"embed_steps": a.embed_steps} if a.first_stage == "embedder" else {}
    print(json.dumps(ensure_world(a.out, a.seed, a.stage, n_eval_queries=a.eval_queries, n_candidates=a.candidates,
                                  n_train=a.train, pretrain_steps=a.pretrain_steps, first_stage=a.first_stage,
                                  **extra), indent=2))


if __name__ == "__main__":
    main()
