"""A synthetic world of shapes on a 3x3 grid, drawn with PIL, and its text in LLaVA's dataset formats.

Each image holds one to four shapes (6 kinds, 8 colours, 3 sizes), at most one per cell of a
3x3 grid of named positions, on a dark or light background (plain, gradient or noisy). With the
vision tower's patch size = image size / 3, each of the 9 image tokens sees exactly one cell.

From a scene this module writes what LLaVA-1.5 trains on:
  - stage 1: a short caption under a varied "describe briefly" instruction (blip_laion_cc_sbu_558k.json rows);
  - stage 2: multi-turn short-answer VQA rows (colour, kind, count, position, presence, size), a few
    conversation rows with sentence answers, detailed descriptions, and text-only rows (llava_v1_5_mix665k.json rows);
  - evaluation: single questions with exact answers (LLaVA's question-file rows).
Everything is a pure function of a random.Random, so a seed fixes the world.
See it: python -m nanollava.world (writes world.png, eight scenes with their captions).
"""
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nanollava.templates import SHORT_ANSWER

SHORT = "\n" + SHORT_ANSWER  # as the official VQA rows append it

# The cells are named as on a map, one word each, so that a question finds a cell by one word as it finds a
# colour ("top left" took two words, each also matching two other cells, and the language model matched them
# about half as often as it matched a colour).
POSITIONS = ["northwest", "north", "northeast", "west", "center", "east", "southwest", "south", "southeast"]
WHERE = [f"in the {p}" for p in POSITIONS]  # the phrase used inside sentences
KINDS = ["circle", "square", "triangle", "star", "cross", "ring"]
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
          "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
COLOR_NAMES = list(COLORS)
SIZES = ["small", "medium", "large"]
SIZE_FRACTION = [0.55, 0.75, 0.95]  # shape radius as a fraction of half a cell
STYLES = ["plain", "gradient", "noisy"]
JITTER = 0.3  # how far a shape may move off its cell centre, as a fraction of the free room
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    cell: int  # 0..8, raster order: POSITIONS[cell]
    dx: float  # offset of the centre inside its cell, in units of the free room (-1..1)
    dy: float
    rgb: tuple  # the colour with a little jitter


@dataclass
class Scene:
    tone: str  # "dark" or "light"
    style: str  # "plain", "gradient", "noisy"
    bg: tuple  # two background colours (the ends of a gradient; equal for plain and noisy)
    shapes: list
    noise_seed: int

    def asdict(self):  # dataclasses.asdict, without its deep copies (15,000 scenes)
        return {**vars(self), "shapes": [vars(s) for s in self.shapes]}

    def key(self):  # what an image shows, ignoring jitter: used to keep evaluation scenes out of training
        return tuple(sorted((s.cell, s.kind, s.color, s.size) for s in self.shapes))


def sample_scene(rng):
    """Draw a random scene; colours that would not stand out from the background are never used."""
    tone, style = rng.choice(["dark", "light"]), rng.choice(STYLES)
    lo, hi = (25, 75) if tone == "dark" else (175, 225)
    def tint():
        base = rng.randint(lo, hi)
        return tuple(min(255, max(0, base + rng.randint(-20, 20))) for _ in range(3))
    c0 = tint()
    c1 = tint() if style == "gradient" else c0
    # keep a colour only if it is far (in RGB) from both ends of the background
    usable = [c for c in COLOR_NAMES if min(math.dist(COLORS[c], b) for b in (c0, c1)) > 110]
    n = rng.randint(1, 4)
    cells = rng.sample(range(9), n)
    pairs = rng.sample([(k, c) for k in KINDS for c in usable], n)  # (kind, colour) pairs are unique in a scene
    shapes = []
    for cell, (kind, color) in zip(cells, pairs):
        rgb = tuple(min(255, max(0, v + rng.randint(-12, 12))) for v in COLORS[color])
        shapes.append(Shape(kind, color, rng.choice(SIZES), cell, rng.uniform(-1, 1), rng.uniform(-1, 1), rgb))
    shapes.sort(key=lambda s: s.cell)
    return Scene(tone, style, (c0, c1), shapes, rng.randrange(2**31))


# ---------------------------------------------------------------------------------------------- drawing

def _polygon(kind, cx, cy, r):
    """Vertices of a shape of radius r centred at (cx, cy); None for a circle."""
    if kind in ("circle", "ring"):
        return None
    if kind == "square":
        a = r * 0.85
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if kind == "star":  # five points, inner radius 0.45 r
        return [(cx + rr * np.sin(a), cy - rr * np.cos(a))
                for i in range(10) for a, rr in [(np.pi * i / 5, r if i % 2 == 0 else 0.45 * r)]]
    if kind == "cross":  # a plus sign with arms a third of the width
        a, b = r * 0.95, r * 0.33
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape kind {kind!r}")


def draw(scene, size):
    """Render a scene as a size x size RGB image (size divisible by 3). Shapes are drawn 4x larger and
    averaged down, for smooth edges."""
    assert size % 3 == 0, f"image size {size} must be divisible by 3 (a 3x3 grid of cells)"
    noise = np.random.default_rng(scene.noise_seed)
    c0, c1 = np.array(scene.bg, dtype=np.float32)
    t = np.linspace(0, 1, size, dtype=np.float32)
    t = t[:, None] if noise.random() < 0.5 else t[None, :]  # vertical or horizontal gradient
    if noise.random() < 0.5:
        t = 1 - t
    bg = c0 + (c1 - c0) * t[..., None] * np.ones((size, size, 1), np.float32)  # (S, S, 3)
    bg += noise.normal(0, 12 if scene.style == "noisy" else 2, bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))

    k, cell = 4, size / 3
    layer = Image.new("RGBA", (size * k, size * k), (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    for s in scene.shapes:
        r = SIZE_FRACTION[SIZES.index(s.size)] * cell / 2
        room = max(0.0, cell / 2 - r - 1) * JITTER
        cx = (s.cell % 3 + 0.5) * cell + s.dx * room
        cy = (s.cell // 3 + 0.5) * cell + s.dy * room
        poly = _polygon(s.kind, cx * k, cy * k, r * k)
        if poly is None:  # a circle, or a ring: a circle with a hole of half its radius
            pen.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=s.rgb + (255,))
            if s.kind == "ring":
                h = r / 2
                pen.ellipse([(cx - h) * k, (cy - h) * k, (cx + h) * k, (cy + h) * k], fill=(0, 0, 0, 0))
        else:
            pen.polygon(poly, fill=s.rgb + (255,))
    layer = layer.reduce(k)  # the mean of each k x k block: antialiased edges
    return Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")


def patch_labels(scene):
    """Per-cell targets for the vision tower's pretraining, raster order, 9 each:
    kind (0 = empty, 1.. = KINDS), colour and size (-1 where the cell is empty)."""
    kind, color, size = [0] * 9, [-1] * 9, [-1] * 9
    for s in scene.shapes:
        kind[s.cell] = 1 + KINDS.index(s.kind)
        color[s.cell] = COLOR_NAMES.index(s.color)
        size[s.cell] = SIZES.index(s.size)
    return kind, color, size


# ---------------------------------------------------------------------------------------------- language

def _plural(kind, n):
    return kind if n == 1 else (kind + "es" if kind == "cross" else kind + "s")


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene, rng):
    """A short BLIP-style caption: lower case, no final period."""
    parts = [_a(f"{s.size} {s.color} {s.kind} {WHERE[s.cell]}" if rng.random() < 0.5 else
                f"{s.color} {s.kind} {WHERE[s.cell]}") for s in scene.shapes]
    return _join(parts) + f" on a {scene.tone} background"


def describe(scene, rng):
    """A detailed description (the detail_23k rows of LLaVA-Instruct)."""
    n = len(scene.shapes)
    style = {"plain": "plain", "gradient": "softly shaded", "noisy": "grainy"}[scene.style]
    out = [rng.choice([f"The image shows {NUMBERS[n]} {_plural('shape', n)} on a {style} {scene.tone} background.",
                       f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {_plural('shape', n)} on a {scene.tone} {style} background."])]
    for s in scene.shapes:
        where = WHERE[s.cell]
        out.append(rng.choice([f"{where[0].upper() + where[1:]} there is a {s.size} {s.color} {s.kind}.",
                               f"A {s.size} {s.color} {s.kind} sits {where}."]))
    empty = 9 - n
    out.append(f"The other {NUMBERS[empty]} {_plural('cell', empty)} of the grid {'is' if empty == 1 else 'are'} empty."
               if empty else "Every cell of the grid is filled.")
    return " ".join(out)


def cell_words(scene):
    """Each of the 9 cells in words, raster order, with the background ("northwest small red circle dark",
    "north no shape here dark"): what the language model reads in place of the 9 image tokens while it
    pretrains. Empty cells take as many words as full ones, so that a cell's position words weigh the same in
    every cell's mean embedding."""
    there = {s.cell: f"{s.size} {s.color} {s.kind}" for s in scene.shapes}
    return [f"{POSITIONS[c]} {there.get(c, 'no shape here')} {scene.tone}" for c in range(9)]


def facts(scene, rng, n=8):
    """The scene as terse text, each statement a key and then what it determines, in random order:
    "center square. red circle small. is there a blue star? no. how many shapes? 3." prepare.py
    pretrains the language model on it (after the scene given as cell_words), as web text teaches a language
    model which words go together. Every attribute follows every other one somewhere, so each look-up the
    questions need is learned where its key sits right before the answer: n statements about the shapes,
    then counts, presence and an empty cell."""
    shapes, yn = scene.shapes, lambda b: "yes" if b else "no"
    kinds, colors, cells = [s.kind for s in shapes], [s.color for s in shapes], [s.cell for s in shapes]
    out = []
    for _ in range(n):
        s = rng.choice(shapes)
        value = {"color": s.color, "kind": s.kind, "where": POSITIONS[s.cell], "size": s.size}
        keys = {"where": ["where"], "color kind": ["color", "kind"]}  # a key names the shape and what it uses up
        if kinds.count(s.kind) == 1:
            keys["kind"] = ["kind"]
        if colors.count(s.color) == 1:
            keys["color"] = ["color"]
        key = rng.choice(list(keys))
        what = rng.choice([v for v in value if v not in keys[key]])
        out.append(" ".join(value[k] for k in keys[key]) + f" {value[what]}.")
    c, k = rng.choice(COLOR_NAMES), rng.choice(KINDS)
    out.append(rng.choice([f"how many {c} shapes? {colors.count(c)}.", f"how many {_plural(k, 2)}? {kinds.count(k)}."]))
    out.append(f"how many shapes? {len(shapes)}.")
    s = rng.choice(shapes)
    c, k = (s.color, s.kind) if rng.random() < 0.5 else (rng.choice(COLOR_NAMES), rng.choice(KINDS))
    out.append(f"is there {_a(c)} {k}? {yn((c, k) in zip(colors, kinds))}.")
    k = rng.choice(KINDS)
    out.append(f"is there {_a(k)}? {yn(k in kinds)}.")
    cell = rng.randrange(9)
    out.append(f"is there a shape {WHERE[cell]}? {yn(cell in cells)}.")
    empty = [i for i in range(9) if i not in cells]
    if empty:
        out.append(f"{POSITIONS[rng.choice(empty)]} nothing.")
    rng.shuffle(out)
    return " ".join(out)


def question(scene, rng, qtype):
    """One question of a type about a scene: (question, short answer, sentence answer)."""
    shapes = scene.shapes
    s = rng.choice(shapes)
    kinds = [x.kind for x in shapes]
    colors = [x.color for x in shapes]
    if qtype == "color":
        if kinds.count(s.kind) == 1 and rng.random() < 0.5:
            q = rng.choice([f"What color is the {s.kind}?", f"What is the color of the {s.kind}?"])
        else:
            q = rng.choice([f"What color is the shape {WHERE[s.cell]}?", f"What is the color of the shape {WHERE[s.cell]}?"])
        return q, s.color, f"The {s.kind} {WHERE[s.cell]} is {s.color}."
    if qtype == "kind":
        if colors.count(s.color) == 1 and rng.random() < 0.5:
            q = rng.choice([f"What shape is {s.color}?", f"Which shape is {s.color}?"])
        else:
            q = rng.choice([f"What shape is {WHERE[s.cell]}?", f"What kind of shape is {WHERE[s.cell]}?"])
        return q, s.kind, f"It is {_a(s.color)} {s.kind}."
    if qtype == "count":
        r = rng.random()
        if r < 0.5:
            q, n, what = rng.choice(["How many shapes are there?", "How many shapes are in the image?"]), len(shapes), "shape"
        elif r < 0.75:
            c = rng.choice(colors) if rng.random() < 0.7 else rng.choice(COLOR_NAMES)
            q, n, what = f"How many {c} shapes are there?", colors.count(c), f"{c} shape"
        else:
            k = rng.choice(kinds) if rng.random() < 0.7 else rng.choice(KINDS)
            q, n, what = f"How many {_plural(k, 2)} are there?", kinds.count(k), k
        return q, str(n), f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {_plural(what, n)}."
    if qtype == "position":
        q = rng.choice([f"Where is the {s.color} {s.kind}?", f"In which part of the image is the {s.color} {s.kind}?"])
        return q, POSITIONS[s.cell], f"The {s.color} {s.kind} is {WHERE[s.cell]}."
    if qtype == "size":
        q = rng.choice([f"What size is the {s.color} {s.kind}?", f"Is the {s.color} {s.kind} small, medium or large?"])
        return q, s.size, f"The {s.color} {s.kind} is {s.size}."
    if qtype == "presence":  # half yes, half no: pick a thing that is there or one that is not
        yes, r = rng.random() < 0.5, rng.random()
        if r < 0.4:
            there = {(x.color, x.kind) for x in shapes}
            c, k = rng.choice(sorted(there if yes else {(c, k) for c in COLOR_NAMES for k in KINDS} - there))
            q, thing = rng.choice([f"Is there {_a(c)} {k} in the image?", f"Is there {_a(c)} {k}?"]), f"{c} {k}"
        elif r < 0.7:
            k = rng.choice(sorted(set(kinds) if yes else set(KINDS) - set(kinds)))
            q, thing = rng.choice([f"Is there a {k} in the image?", f"Is there a {k}?"]), k
        else:
            cells = {x.cell for x in shapes}
            cell = rng.choice(sorted(cells if yes else set(range(9)) - cells))
            return f"Is there a shape {WHERE[cell]}?", "yes" if yes else "no", \
                f"{'Yes' if yes else 'No'}, {WHERE[cell]} there is {'a shape' if yes else 'nothing'}."
        return q, "yes" if yes else "no", f"{'Yes' if yes else 'No'}, there is {_a(thing) if yes else 'no ' + thing}."
    raise ValueError(f"unknown question type {qtype!r}")


QTYPES = ["color", "kind", "count", "position", "presence", "size"]

BRIEF = ["Describe the image concisely.", "Provide a brief description of the given image.",
         "Offer a succinct explanation of the picture presented.", "Summarize the visual content of the image.",
         "Give a short and clear explanation of the subsequent image.", "Share a concise interpretation of the image provided.",
         "Present a compact description of the photo's key features.", "Relay a brief, clear account of the picture shown.",
         "Render a clear and concise summary of the photo.", "Write a terse but informative summary of the picture.",
         "Create a compact narrative representing the image presented."]  # LLaVA paper, table 8
DETAILED = ["Describe the following image in detail.", "Provide a detailed description of the given image.",
            "Give an elaborate explanation of the image you see.", "Share a comprehensive rundown of the presented image.",
            "Offer a thorough analysis of the image.", "Explain the various aspects of the image before you.",
            "Walk through the important details of the image.", "Write an exhaustive depiction of the given image."]  # table 9


def _turns(pairs):
    """[(human, gpt), ...] -> LLaVA conversations; callers put "<image>\\n" in the first human turn."""
    return [t for h, g in pairs for t in ({"from": "human", "value": h}, {"from": "gpt", "value": g})]


def stage1_row(scene, rng, rid, image):
    return {"id": rid, "image": image,
            "conversations": _turns([("<image>\n" + rng.choice(BRIEF), caption(scene, rng))])}


def stage2_rows(scene, rng, rid, image, p_detail=0.2, p_chat=0.2):
    """Rows for one training image: always a multi-turn short-answer VQA row (like the official
    VQAv2/GQA rows), sometimes a detailed description and a conversation with sentence answers."""
    types = rng.sample(QTYPES, rng.randint(3, 5))
    pairs = [(q + SHORT, a) for q, a, _ in (question(scene, rng, t) for t in types)]
    pairs[0] = ("<image>\n" + pairs[0][0], pairs[0][1])
    rows = [{"id": f"{rid}-vqa", "image": image, "conversations": _turns(pairs)}]
    if rng.random() < p_detail:
        rows.append({"id": f"{rid}-detail", "image": image,
                     "conversations": _turns([("<image>\n" + rng.choice(DETAILED), describe(scene, rng))])})
    if rng.random() < p_chat:
        pairs = [(q, sentence) for q, _, sentence in (question(scene, rng, t) for t in rng.sample(QTYPES, 2))]
        pairs[0] = ("<image>\n" + pairs[0][0], pairs[0][1])
        rows.append({"id": f"{rid}-chat", "image": image, "conversations": _turns(pairs)})
    return rows


def eval_rows(scene, rng, qid, image, qtypes):
    """Question-file rows (LLaVA's eval format) with the exact short answer."""
    rows = []
    for t in qtypes:
        q, a, _ = question(scene, rng, t)
        rows.append({"question_id": qid + len(rows), "image": image, "text": q + SHORT, "answer": a, "category": t})
    return rows


def text_only_row(rng, rid):
    """A question about the world with no image (the official mix has ShareGPT text-only rows)."""
    r = rng.random()
    if r < 0.4:  # neighbours on the grid
        cell = rng.randrange(9)
        row, col = divmod(cell, 3)
        moves = [(d, c) for d, c in [("above", cell - 3 if row > 0 else None), ("below", cell + 3 if row < 2 else None),
                                     ("to the left of", cell - 1 if col > 0 else None),
                                     ("to the right of", cell + 1 if col < 2 else None)] if c is not None]
        d, other = rng.choice(moves)
        q, a = f"On a three by three grid, which position is directly {d} the {POSITIONS[cell]}?", POSITIONS[other]
        sentence = f"The position directly {d} the {POSITIONS[cell]} is the {POSITIONS[other]}."
    elif r < 0.6:
        pairs = [("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple")]
        x, y, z = rng.choice(pairs)
        q, a, sentence = f"Which color do you get by mixing {x} and {y} paint?", z, f"Mixing {x} and {y} paint gives {z}."
    elif r < 0.8:
        k, part, n = rng.choice([("triangle", "corners", 3), ("square", "corners", 4), ("star", "points", 5), ("cross", "arms", 4)])
        q, a, sentence = f"How many {part} does a {k} have?", str(n), f"A {k} has {NUMBERS[n]} {part}."
    else:
        a_, b_ = rng.randint(0, 4), rng.randint(0, 4)
        q, a, sentence = f"What is {a_} plus {b_}?", str(a_ + b_), f"{a_} plus {b_} is {a_ + b_}."
    pair = (q + SHORT, a) if rng.random() < 0.5 else (q, sentence)
    return {"id": rid, "conversations": _turns([pair])}


def count_one(scene, rng):
    """"How many KIND/COLOR shapes are there?": the question type the default world model is weakest at (prepare.py's
    custom fine-tuning set, README "Fine-tune on your own data"). Half about a kind, half a colour; mostly one the
    image has, sometimes one it has not (answer 0). Returns (question, short answer)."""
    kinds, colors = [x.kind for x in scene.shapes], [x.color for x in scene.shapes]
    if rng.random() < 0.5:
        k = rng.choice(kinds) if rng.random() < 0.8 else rng.choice(KINDS)
        return f"How many {_plural(k, 2)} are there?", str(kinds.count(k))
    c = rng.choice(colors) if rng.random() < 0.8 else rng.choice(COLOR_NAMES)
    return f"How many {c} shapes are there?", str(colors.count(c))


def count_rows(scene, rng, rid, image, turns=2):
    """A training row of `turns` count_one questions (short answers) about one image, in LLaVA's format."""
    asked = {}
    for _ in range(4 * turns):  # distinct questions (an image with one kind and colour has only a few)
        q, a = count_one(scene, rng)
        asked.setdefault(q, a)
        if len(asked) == turns:
            break
    pairs = [(q + SHORT, a) for q, a in asked.items()]
    pairs[0] = ("<image>\n" + pairs[0][0], pairs[0][1])
    return {"id": rid, "image": image, "conversations": _turns(pairs)}


def sample_scenes(rng, n, exclude=()):
    """n scenes whose layouts (Scene.key) are not in exclude."""
    out = []
    while len(out) < n:
        s = sample_scene(rng)
        if s.key() not in exclude:
            out.append(s)
    return out


if __name__ == "__main__":  # draw a few scenes side by side: python -m nanollava.world
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    sheet = Image.new("RGB", (8 * 100, 100), "gray")
    for i, s in enumerate(scenes):
        sheet.paste(draw(s, 96), (i * 100 + 2, 2))
        print(i, caption(s, rng))
    sheet.save("world.png")
    print("wrote world.png")
