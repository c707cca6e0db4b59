"""Probes of a frozen vision tower, after PIVOT's encoder evaluation (arXiv 2510.16333; docs/gmr.md §6.1).

PIVOT post-trains a whole MLLM (vision tower included) with SFT or DPO, then takes the vision tower out and asks
what it learned, with the language model out of the way:

  - linear probes: a logistic regression on frozen, mean-pooled patch-merger features (N/4, out) -> (out,) predicts
    each attribute (count, colour, shape, position) of single-group pictures drawn by scenes.py; accuracy on
    held-out pictures (PIVOT: an ImageNet linear probe, the OpenAI-CLIP recipe);
  - localisation: how much of the encoder's response to the group falls inside the region where scenes.py drew
    it. Occlusion: the per-patch distance ||f_i - b_i|| between the ViT's patch features (gh, gw, D) of the
    picture and of the same-sized empty background, and the share of its mass on patches whose centre lies in
    the group's region (an encoder that does not localise spreads it as the region's area share);
  - transplant: the untouched base checkpoint with the arm's vision tower and a freshly initialised patch merger
    (PIVOT's new random projector), which pivot.py then trains with train.py --train lora+projector.

Everything is fp32 on the CPU and seeded: the same tower and seed give the same numbers.
"""
import os
import random
import shutil

import torch
import torch.nn as nn

from .files import write_json
from .model import Qwen25VL
from .processor import ImageProcessor
from .scenes import ALL_GROUPS, ATTRIBUTES, POSITIONS, VALUES, draw_scene
from .vision import PatchMerger, window_index


# ------------------------------------------------------------------------------------------------------ pictures
def probe_pictures(n: int, seed: int) -> list:
    """n single-group pictures, each a dict: group, image, blank (the same size and background, nothing drawn)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        group = rng.choice(ALL_GROUPS)
        image = draw_scene([group], rng)
        # every region starts 4% in from the edges, so the corner pixel is the background
        blank = image.copy()
        blank.paste(image.getpixel((0, 0)), (0, 0, *image.size))
        out.append({"group": group, "image": image, "blank": blank})
    return out


def labels(pictures: list, attribute: str) -> torch.Tensor:
    """(n,) long: the index of each picture's value of `attribute` in scenes.VALUES."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
    return torch.tensor([VALUES[attribute].index(getattr(p["group"], attribute)) for p in pictures])


# ------------------------------------------------------------------------------------------------------ features
def to_grid(blocks, gh: int, gw: int, merge: int = 2) -> torch.Tensor:
    """(gh*gw/merge², merge², D) blocks in raster order, patches row-major in a block (the processor's row order,
    vision.rotary_position_ids) -> (gh, gw, D), the picture's patch grid."""
    b = blocks.reshape(gh // merge, gw // merge, merge, merge, -1)  # (bh, bw, mh, mw, D)
    return b.permute(0, 2, 1, 3, 4).reshape(gh, gw, -1)


@torch.no_grad()
def tower_features(vision, image_processor: ImageProcessor, images: list, batch: int = 32) -> list:
    """Per image: (merged (gh/2 * gw/2, out) in raster order, patches (gh, gw, D) the ViT's last block's output).

    The patches are the merger's input, caught by a forward hook: (N, D) in window order, 2x2 blocks of 4
    consecutive rows (vision.py), put back in raster order here."""
    merge = vision.cfg.spatial_merge_size
    caught = []
    hook = vision.merger.register_forward_hook(lambda module, args, output: caught.append(args[0]))
    out = []
    try:
        for start in range(0, len(images), batch):
            pixels, grid = image_processor(images[start:start + batch])
            caught.clear()
            merged = vision(pixels.float(), grid).float()  # (sum of gh*gw/4, out), raster order
            win_idx, _ = window_index(grid, merge, vision.cfg.window_size // merge // vision.cfg.patch_size)
            d = caught[0].shape[-1]
            blocks = caught[0].float().reshape(-1, merge * merge, d)[torch.argsort(win_idx)]  # (N/4, 4, D) raster
            offset = 0
            for _, gh, gw in grid.tolist():
                n = gh * gw // (merge * merge)
                out.append((merged[offset:offset + n], to_grid(blocks[offset:offset + n], gh, gw, merge)))
                offset += n
    finally:
        hook.remove()
    return out


def pooled(features: list) -> torch.Tensor:
    """(n, out): each picture's merged features, mean-pooled over its tokens."""
    return torch.stack([merged.mean(0) for merged, _ in features])


# ------------------------------------------------------------------------------------------------------ linear probe
def linear_probe(x_train, y_train, x_test, n_classes: int, seed: int = 0, l2: float = 1e-3, iters: int = 200):
    """Multinomial logistic regression (fp32, full-batch L-BFGS, L2 penalty `l2` on the weights) on standardised
    features; -> (n_test,) predicted class of each test row."""
    x_train, x_test = x_train.float(), x_test.float()
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # train statistics only: nothing of the test leaks
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x_train.shape[1], n_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x_train), y_train) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return head(x_test).argmax(-1)


def probe_attributes(train_feats, train_pics, test_feats, test_pics, seed: int = 0) -> dict:
    """{attribute: (n_test,) 0/1 list, whether each held-out picture's attribute was predicted right}."""
    x_train, x_test = pooled(train_feats), pooled(test_feats)
    out = {}
    for a in ATTRIBUTES:
        pred = linear_probe(x_train, labels(train_pics, a), x_test, len(VALUES[a]), seed)
        out[a] = (pred == labels(test_pics, a)).int().tolist()
    return out


# ------------------------------------------------------------------------------------------------------ localisation
def region_mask(group, gh: int, gw: int) -> torch.Tensor:
    """(gh, gw) bool: the patches whose centre lies in the group's drawing region (scenes.POSITIONS)."""
    x0, y0, x1, y1 = POSITIONS[group.position][1]
    ys, xs = (torch.arange(gh) + 0.5) / gh, (torch.arange(gw) + 0.5) / gw
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def response_map(picture_patches, blank_patches) -> torch.Tensor:
    """(gh, gw): how much each patch feature moves when the group is drawn, ||f_i - b_i||."""
    return (picture_patches - blank_patches).norm(dim=-1)


def localisation(picture_feats, blank_feats, pictures) -> dict:
    """Per picture: the share of the response mass inside the group's region, and the region's area share."""
    share, area = [], []
    for (_, f), (_, b), p in zip(picture_feats, blank_feats, pictures):
        r = response_map(f, b)
        mask = region_mask(p["group"], *r.shape)
        share.append(float(r[mask].sum() / r.sum().clamp_min(1e-12)))
        area.append(float(mask.float().mean()))
    return {"share": share, "area": area}


def probe_tower(vision, image_processor, train_pics, test_pics, seed: int = 0) -> dict:
    """Linear probes (trained on train_pics, scored on test_pics) and localisation (on test_pics) of one tower."""
    vision.eval()
    train = tower_features(vision, image_processor, [p["image"] for p in train_pics])
    test = tower_features(vision, image_processor, [p["image"] for p in test_pics])
    blank = tower_features(vision, image_processor, [p["blank"] for p in test_pics])
    return {"probe": probe_attributes(train, train_pics, test, test_pics, seed),
            "localisation": localisation(test, blank, test_pics),
            "example_map": response_map(test[0][1], blank[0][1]).tolist()}  # the first held-out picture's (gh, gw)


@torch.no_grad()
def weight_change(vision, base_vision) -> float:
    """||w - w_base|| / ||w_base|| over the ViT's patch embedding and blocks (the merger left out): how far
    post-training moved the tower."""
    mine, base = dict(vision.named_parameters()), dict(base_vision.named_parameters())
    names = [n for n in base if not n.startswith("merger.")]
    diff = sum(float((mine[n].float() - base[n].float()).pow(2).sum()) for n in names)
    return (diff / sum(float(base[n].float().pow(2).sum()) for n in names)) ** 0.5


# ------------------------------------------------------------------------------------------------------ transplant
def fresh_merger(vision_cfg, seed: int) -> PatchMerger:
    """A patch merger initialised as Qwen25VL initialises one (N(0, 0.02) weights, zero biases, unit norm), from
    `seed` alone: the same seed always gives the same projector."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        merger = PatchMerger(vision_cfg)
        merger.apply(Qwen25VL._init_weights)
    return merger


def write_transplant(base: str, arm: str, out: str, seed: int) -> None:
    """out = the base checkpoint, with the arm checkpoint's vision tower (patch embedding and blocks) and a fresh
    patch merger (fresh_merger(seed)); the base's tokenizer and preprocessor files. Written to a temporary sibling
    folder and renamed, so a folder at `out` is always complete."""
    model, donor = Qwen25VL.from_pretrained(base), Qwen25VL.from_pretrained(arm)
    if donor.config.vision != model.config.vision:
        raise ValueError(f"{arm}: its vision tower's config differs from the base checkpoint's ({base})")
    model.vision.patch_embed.load_state_dict(donor.vision.patch_embed.state_dict())
    model.vision.blocks.load_state_dict(donor.vision.blocks.state_dict())
    model.vision.merger.load_state_dict(fresh_merger(model.config.vision, seed).state_dict())
    tmp = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(base, name), os.path.join(tmp, name))
    write_json(os.path.join(tmp, "transplant.json"), {"base": base, "vision_tower_from": arm, "merger_seed": seed})
    os.rename(tmp, out)
