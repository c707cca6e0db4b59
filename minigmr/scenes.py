"""The synthetic world's scenes: groups of flat shapes, their words, and their pictures. A leaf module (PIL only).

Every scene is one or more *groups* of shapes: (count, colour, shape, position), e.g. "two red circles on the left".
A group is drawn with PIL on a plain background, described in words (captions, questions, passages), and printed
as a small "document screenshot" (a white page of text in PIL's built-in bitmap font). synth.py builds datasets and
a checkpoint from these; pretrain.py teaches the checkpoint to caption them. Randomness always comes from the
`rng` (a random.Random) the caller passes, so a scene is a pure function of its caller's seed.
"""
import hashlib
import itertools
import math
import os
import random
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont

ATTRIBUTES = ("count", "colour", "shape", "position")
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four"}
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (230, 190, 20),
           "purple": (148, 103, 189), "orange": (255, 127, 14)}
SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
          "diamond": "diamonds"}  # singular -> plural
POSITIONS = {  # name -> (phrase, region (x0, y0, x1, y1) as fractions of the image)
    "left": ("on the left", (0.04, 0.1, 0.46, 0.9)), "right": ("on the right", (0.54, 0.1, 0.96, 0.9)),
    "top": ("at the top", (0.1, 0.04, 0.9, 0.46)), "bottom": ("at the bottom", (0.1, 0.54, 0.9, 0.96)),
    "centre": ("in the centre", (0.25, 0.25, 0.75, 0.75))}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}  # where a second group goes
VALUES = {"count": tuple(COUNTS), "colour": tuple(COLOURS), "shape": tuple(SHAPES), "position": tuple(POSITIONS)}
BACKGROUNDS = ((255, 255, 255), (238, 238, 238), (250, 244, 228))
SCENE_SIDES = (84, 112)  # width and height each drawn from these (smart_resize keeps multiples of 28 as they are)
PAGE_SIZES = ((140, 112), (168, 98), (168, 112))  # (width, height) of document screenshots

# Text templates. Fields: scene (full description), count, colour, shape(s), pos, num.
TEMPLATES = {
    "question": ("which passage mentions {scene}?", "which page mentions {scene}?", "find the note about {scene}."),
    "caption": ("{scene}", "a picture of {scene}", "an image with {scene}"),
    "passage": ("note {num}. the picture shows {scene}.", "record {num}: we drew {scene} on a plain page.",
                "entry {num}. it has {scene}. nothing else is drawn."),
    "image+title": ("{colour} {shapes}", "a picture of {shapes}", "shapes {pos}"),
    "image+question": ("how many {colour} {shapes} are in the picture?", "what colour are the {shapes} {pos}?",
                       "which shapes are {pos}?", "where are the {colour} {shapes}?"),
    "image+ask": ("find the card with this picture.", "which card shows these {shapes}?",
                  "find a card with the same {colour} shapes."),
    "image+passage": ("note {num}. the picture shows {scene}.", "entry {num}. it has {scene}."),
}
EDITS = {"count": "show {count} of them instead.", "colour": "make them {colour}.", "shape": "turn them into {shapes}.",
         "position": "move them {pos}."}  # IT->I: the edit that turns the reference image into the target


class Group(NamedTuple):
    """One group of identical shapes in a scene."""
    count: int
    colour: str
    shape: str
    position: str


ALL_GROUPS = [Group(*v) for v in itertools.product(*VALUES.values())]  # 4 * 6 * 6 * 5 = 720


def mutate(g: Group, attr: str, rng) -> Group:
    """The same group with one attribute changed to another value: a hard negative."""
    return g._replace(**{attr: rng.choice([v for v in VALUES[attr] if v != getattr(g, attr)])})


def grade(target: Group, groups: list[Group]) -> int:
    """Relevance of a document showing `groups` to a query for `target`: 2 exact, 1 target plus more, 0 otherwise."""
    return 2 if groups == [target] else int(target in groups)


def describe(groups: list[Group]) -> str:
    """'two red circles on the left and one blue star on the right'."""
    return " and ".join(f"{COUNTS[g.count]} {g.colour} {g.shape if g.count == 1 else SHAPES[g.shape]} "
                        f"{POSITIONS[g.position][0]}" for g in groups)


def fields(groups: list[Group], num: int) -> dict:
    """The template fields of a scene; the single-attribute ones name its first group."""
    g = groups[0]
    return dict(scene=describe(groups), count=COUNTS[g.count], colour=g.colour, shape=g.shape,
                shapes=SHAPES[g.shape], pos=POSITIONS[g.position][0], num=num)


def draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "cross":
        t = r / 3
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:  # polygons given on the unit circle, y down; a star alternates outer and inner (0.45) points
        unit = {"triangle": [(0, -1), (0.87, 0.6), (-0.87, 0.6)], "diamond": [(0, -1), (0.75, 0), (0, 1), (-0.75, 0)],
                "star": [((1, 0.45)[k % 2] * math.sin(math.pi * k / 5), -(1, 0.45)[k % 2] * math.cos(math.pi * k / 5))
                         for k in range(10)]}[shape]
        d.polygon([(cx + r * x, cy + r * y) for x, y in unit], fill=fill)


def draw_scene(groups: list[Group], rng) -> Image.Image:
    """Each group's shapes on a grid inside its position's region, with jitter and a random size."""
    w, h = rng.choice(SCENE_SIDES), rng.choice(SCENE_SIDES)
    img = Image.new("RGB", (w, h), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    for g in groups:
        x0, y0, x1, y1 = POSITIONS[g.position][1]
        bx, by, bw, bh = x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h
        grids = [(1, g.count), (g.count, 1)] + ([(2, 2)] if g.count >= 3 else [])  # (rows, cols)
        rows, cols = max(grids, key=lambda rc: min(bw / rc[1], bh / rc[0]))
        cw, ch = bw / cols, bh / rows
        r = min(cw, ch, 0.3 * min(w, h)) * rng.uniform(0.3, 0.42)  # radius
        for cell in sorted(rng.sample(range(rows * cols), g.count)):
            i, j = divmod(cell, cols)
            cx = bx + (j + 0.5) * cw + rng.uniform(-0.4, 0.4) * (cw / 2 - r)
            cy = by + (i + 0.5) * ch + rng.uniform(-0.4, 0.4) * (ch / 2 - r)
            draw_shape(d, g.shape, cx, cy, r, COLOURS[g.colour])
    return img


def draw_page(text: str, rng) -> Image.Image:
    """A 'document screenshot': a header band with a page number, then `text` word-wrapped in black."""
    # The bitmap font ships inside Pillow (no system fonts); load_default() became a FreeType font in Pillow 10.1.
    font = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()
    w, h = rng.choice(PAGE_SIZES)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w, 14), fill=(222, 226, 236))
    d.text((4, 2), f"page {rng.randint(1, 99)}", fill=(70, 70, 70), font=font)
    lines = [""]
    for word in text.split():
        fits = d.textlength(f"{lines[-1]} {word}".strip(), font=font) <= w - 8
        lines[-1:] = [f"{lines[-1]} {word}".strip()] if fits else [lines[-1], word]
    if 18 + 12 * len(lines) > h:
        raise ValueError(f"page text does not fit a {w}x{h} page: {text!r}")
    for i, line in enumerate(lines):
        d.text((4, 18 + 12 * i), line, fill=(0, 0, 0), font=font)
    return img


def picture_saver(folder: str, stream: str):
    """`picture(key, draw) -> path relative to folder`. The file name is an opaque hash of the key (so it does
    not leak the attributes), and draw's randomness comes from the key alone: same key, same picture, saved once."""
    done = set()

    def picture(key: str, draw) -> str:
        name = "images/" + hashlib.sha1(f"{stream}/{key}".encode()).hexdigest()[:16] + ".png"
        if name not in done:
            draw(random.Random(f"{stream}/{key}")).save(os.path.join(folder, name))
            done.add(name)
        return name
    return picture
