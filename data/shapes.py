"""The embedded shapes dataset: procedural scenes, their texts, and an exact oracle.

A scene is 1-4 flat-coloured shapes on a plain grey background. From one scene come
  - an image                    render(scene, resolution)
  - a caption                   caption(scene)      "a small red circle above a large blue square"
  - text-to-image prompts       t2i_prompt(scene, rng), GenEval-style, each with a checkable spec
  - a VQA pair                  vqa(scene, rng)     ("what color is the circle", "red")
  - an editing pair             edit(scene, rng)    ("make the circle green", new_scene)
and the oracle reads any image back into objects (read_objects) to score generations, captions,
answers and edits; evaluate_shapes runs a model through it (train.py's eval.json). All texts are
lowercase words without punctuation, so a word-level tokenizer covers them exactly (WORDS lists
every word the dataset can emit).

Why the oracle is exact: objects never touch (a gap of >= 2.5 px at 32 px), the background is
achromatic, and every palette colour has the same chroma. Blending a colour with grey (anti-aliasing,
blur, a VAE's reconstruction) keeps its hue and scales its chroma, so chroma / palette chroma is a
pixel's coverage: foreground = coverage above 0.5, colour = nearest palette hue of the component's
mean, size = its extent, position = its box centre, and shape from cumulants of the coverage, which a
symmetric blur leaves unchanged (a triangle's is skewed; a square's is flatter than a circle's).

Held-out split: scenes of split 'train' never contain the colour-shape pairs in HELDOUT_PAIRS
(not in images, captions, questions or edits); other splits draw from every pair and from distinct
seeds. Everything is a pure function of a numpy Generator, seeded per sample from (seed, split, index).
"""
import colorsys
import itertools
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- vocabulary

# six hues 60 degrees apart (HSV S=0.85, V=0.9: equal chroma), so a hue error up to 30 deg is tolerated
HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "purple": 300}
PALETTE = {c: tuple(round(255 * v) for v in colorsys.hsv_to_rgb(h / 360, 0.85, 0.9)) for c, h in HUES.items()}
COLORS = tuple(HUES)
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (128, 128, 128)  # mid grey: achromatic (keeps hues under blending) and zero in [-1, 1]
# side of the bounding box as a fraction of the canvas: 10 px / 16 px at the 32 px quickstart
SIZES = {"small": 0.3125, "large": 0.5}
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("zero", "one", "two", "three", "four")
DIRECTIONS = ("left", "right", "top", "bottom")  # edit: move an object against that edge
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's names
# (colour, shape) combinations that never occur in the training split: eval reports them separately
HELDOUT_PAIRS = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SPLITS = {"train": 0, "val": 1, "test": 2}

GAP = 0.08       # minimum empty space between two objects' boxes (2.6 px at 32 px)
BORDER = 0.03    # minimum margin to the canvas edge
CLEAR = 0.1      # a relation is only stated when |dx| and |dy| differ by at least this much
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges that are linear blends


def _plural(shape):
    return shape + "s"


WORDS = sorted(set(
    "a and the of is are there what color shape size how many where relative to object objects yes no "
    "make move add remove left right top bottom above below".split())
    | set(COLORS) | set(SHAPES) | {_plural(s) for s in SHAPES} | set(SIZES) | set(NUMBERS))


def max_objects_for(resolution):
    """Default object count limit: 2 at the 32 px quickstart, 4 from 64 px on."""
    return 2 if resolution < 64 else 4


# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # bounding-box centre, fraction of the canvas width (0 = left)
    y: float  # fraction of the canvas height (0 = top)

    @property
    def side(self):
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    objects: tuple
    free: tuple = ()  # edit targets only: indices of objects whose position is not prescribed ("add")


def rng_for(seed, split, index):
    """The generator of one sample: the same (seed, split, index) gives the same sample anywhere."""
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def allowed_pairs(split):
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return [p for p in pairs if p not in HELDOUT_PAIRS] if split == "train" else pairs


def _separated(a, b, gap=GAP):
    """Boxes apart by at least `gap` along x or along y."""
    half = (a.side + b.side) / 2 + gap
    return abs(a.x - b.x) >= half or abs(a.y - b.y) >= half


def relation(a, b):
    """Where a is relative to b, by the dominant axis of their centres (y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def clear_relation(a, b):
    return abs(abs(a.x - b.x) - abs(a.y - b.y)) >= CLEAR


def _place(rng, size, others, tries=256, clear=False):
    """A random centre (x, y) for an object of this size that keeps clear of the others (and with
    clear=True, in a clear relation to each of them), or None."""
    s = SIZES[size]
    lo, hi = s / 2 + BORDER, 1 - s / 2 - BORDER
    if not others:
        x, y = rng.uniform(lo, hi, size=2)
        return float(x), float(y)
    xy = rng.uniform(lo, hi, size=(tries, 2))  # vectorised rejection sampling
    ok = np.ones(tries, dtype=bool)
    for p in others:
        half = (s + p.side) / 2 + GAP
        dx, dy = np.abs(xy[:, 0] - p.x), np.abs(xy[:, 1] - p.y)
        ok &= (dx >= half) | (dy >= half)
        if clear:
            ok &= np.abs(dx - dy) >= CLEAR
    k = np.flatnonzero(ok)
    return (float(xy[k[0], 0]), float(xy[k[0], 1])) if len(k) else None


def random_scene(rng, split="train", resolution=32, max_objects=None, n_objects=None, pairs=None):
    """1..max_objects non-touching objects; a 2-object scene always has a clear relation.

    pairs: the (colour, shape) pairs to draw from (default: all pairs allowed in `split`).
    A large object that finds no room becomes small (at 32 px two large objects never fit together).
    """
    max_objects = max_objects or max_objects_for(resolution)
    pairs = pairs or allowed_pairs(split)
    n = n_objects or int(rng.integers(1, max_objects + 1))
    for _ in range(100):
        objs = []
        for _ in range(n):
            color, shape = pairs[rng.integers(len(pairs))]
            size = ("small", "large")[rng.integers(2)]
            pos = _place(rng, size, objs, clear=n == 2)
            if pos is None and size == "large":  # no room for a large one: try a small one
                size, pos = "small", _place(rng, "small", objs, clear=n == 2)
            if pos is None:
                break
            objs.append(Obj(shape, color, size, *pos))
        if len(objs) == n and (n != 2 or clear_relation(*objs)):
            return Scene(tuple(objs))
    raise RuntimeError(f"could not place {n} objects; lower max_objects for this resolution")


def render(scene, resolution=32):
    """PIL RGB image of the scene: shapes drawn at 4x and box-filtered down (anti-aliased)."""
    big = resolution * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        half = o.side * big / 2
        x0, y0, x1, y1 = o.x * big - half, o.y * big - half, o.x * big + half, o.y * big + half
        if o.shape == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=PALETTE[o.color])
        elif o.shape == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=PALETTE[o.color])
        else:  # upright isosceles triangle filling its box
            draw.polygon([(o.x * big, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=PALETTE[o.color])
    return img.resize((resolution, resolution), Image.BOX)


# ----------------------------------------------------------------------------- texts

def _phrase(o, size=True, color=True):
    words = ([o.size] if size else []) + ([o.color] if color else []) + [o.shape]
    return " ".join(words)


def caption(scene):
    """The canonical full description: every object with size, colour, shape; 2 objects with their
    relation, stated from the left / upper one; 3-4 objects listed left to right."""
    objs = list(scene.objects)
    if len(objs) == 2:
        a, b = objs
        if relation(a, b) in ("right of", "below"):
            a, b = b, a
        return f"a {_phrase(a)} {relation(a, b)} a {_phrase(b)}"
    objs.sort(key=lambda o: (o.x, o.y))
    return " and ".join(f"a {_phrase(o)}" for o in objs)


def _want(o, size=False, color=False):
    """A spec entry for one object; attributes left None are not checked."""
    return {"shape": o.shape, "color": o.color if color else None, "size": o.size if size else None}


def scene_spec(scene):
    """The spec of caption(scene): exactly these objects, with sizes and colours (and the relation)."""
    objs = list(scene.objects)
    spec = {"objects": [_want(o, True, True) for o in objs], "count": None, "relation": None, "exact": True}
    if len(objs) == 2:
        spec["relation"] = relation(objs[0], objs[1])
    return spec


def prompt_tasks(scene):
    """The GenEval-style prompt kinds that describe all of this scene's objects."""
    objs = scene.objects
    kinds = []
    if len(objs) == 1:
        kinds += ["single_object", "colors"]
    if len(objs) == 2:  # as in GenEval, the two named objects differ (same shapes: 'counting')
        a, b = objs
        if a.shape != b.shape:
            kinds.append("two_object")
            if clear_relation(a, b):
                kinds.append("position")
        if (a.color, a.shape) != (b.color, b.shape):
            kinds.append("color_attr")
    if len(objs) >= 2 and len({o.shape for o in objs}) == 1:
        kinds.append("counting")
    return kinds


def task_prompt(scene, task, rng):
    """(prompt, spec) of one GenEval task for a scene that prompt_tasks(scene) allows it for.

    Objects are named in random order, so every relation word appears in prompts (captions only use
    'left of' and 'above'). The spec is what score_image checks. Every prompt of this dataset names
    all of its scene's objects ('a circle' comes only from one-object scenes), so the spec is exact:
    an image with extra objects fails, as otherwise a canvas full of random blobs would pass.
    """
    objs = list(scene.objects)
    if len(objs) == 2 and rng.random() < 0.5:
        objs = objs[::-1]
    spec = {"objects": [], "count": None, "relation": None, "exact": True}
    if task == "single_object":
        spec["objects"] = [_want(objs[0])]
        return f"a {objs[0].shape}", spec
    if task == "colors":
        spec["objects"] = [_want(objs[0], color=True)]
        return f"a {objs[0].color} {objs[0].shape}", spec
    if task == "two_object":
        spec["objects"] = [_want(o) for o in objs]
        return f"a {objs[0].shape} and a {objs[1].shape}", spec
    if task == "color_attr":
        spec["objects"] = [_want(o, color=True) for o in objs]
        return " and ".join(f"a {o.color} {o.shape}" for o in objs), spec
    if task == "position":
        spec["objects"] = [_want(o) for o in objs]
        spec["relation"] = relation(objs[0], objs[1])
        return f'a {objs[0].shape} {spec["relation"]} a {objs[1].shape}', spec
    if task == "counting":
        spec["objects"] = [_want(objs[0])]
        spec["count"] = len(objs)
        return f"{NUMBERS[len(objs)]} {_plural(objs[0].shape)}", spec
    raise ValueError(f"unknown prompt task {task!r}; expected one of {TASKS}")


def t2i_prompt(scene, rng, full_caption_prob=0.5):
    """A training text-to-image prompt: the full caption, or a GenEval-style partial description."""
    kinds = prompt_tasks(scene)
    if not kinds or rng.random() < full_caption_prob:
        return caption(scene), scene_spec(scene)
    return task_prompt(scene, kinds[rng.integers(len(kinds))], rng)


def _reference(o, objs, without=()):
    """The shortest phrase 'shape' / 'colour shape' / 'size shape' / 'size colour shape' that picks o
    out of objs (skipping the attributes in `without`); for one of two look-alikes 'left shape',
    'top colour shape', ... by their clear relation; None when nothing picks it out."""
    options = [a for a in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))
               if not any(k in without for k in a)]
    for attrs in options:
        if sum(all(getattr(p, a) == getattr(o, a) for a in attrs) for p in objs) == 1:
            return " ".join(getattr(o, a) for a in attrs)
    for attrs in options:
        alike = [p for p in objs if all(getattr(p, a) == getattr(o, a) for a in attrs)]
        if len(alike) == 2:
            other = alike[1] if alike[0] is o else alike[0]
            if clear_relation(o, other):
                side = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}[relation(o, other)]
                return " ".join([side] + [getattr(o, a) for a in attrs])
    return None


def _object_ref(o, objs):
    """'red object' / 'small red object': o picked out without naming its shape."""
    for attrs in (("color",), ("size", "color"), ("size",)):
        if sum(all(getattr(p, a) == getattr(o, a) for a in attrs) for p in objs) == 1:
            return " ".join(getattr(o, a) for a in attrs) + " object"
    return None


def vqa(scene, rng, split="train"):
    """(question, one-word answer) about colour, shape, size, count, existence or relation."""
    objs = list(scene.objects)
    pairs = allowed_pairs(split)
    cands = []
    for o in objs:
        ref = _reference(o, objs, without=("color",))
        if ref:
            cands.append((f"what color is the {ref}", o.color))
        ref = _object_ref(o, objs)
        if ref:
            cands.append((f"what shape is the {ref}", o.shape))
        ref = _reference(o, objs, without=("size",))
        if ref:
            cands.append((f"what size is the {ref}", o.size))
    shape = SHAPES[rng.integers(len(SHAPES))]
    cands.append((f"how many {_plural(shape)} are there", NUMBERS[sum(o.shape == shape for o in objs)]))
    cands.append(("how many objects are there", NUMBERS[len(objs)]))
    color, shape = pairs[rng.integers(len(pairs))]
    present = any(o.color == color and o.shape == shape for o in objs)
    cands.append((f"is there a {color} {shape}", "yes" if present else "no"))
    for a, b in itertools.permutations(objs, 2):
        ra, rb = _reference(a, objs), _reference(b, objs)
        if ra and rb and clear_relation(a, b):
            cands.append((f"where is the {ra} relative to the {rb}", relation(a, b).split()[0]))
    return cands[rng.integers(len(cands))]


VQA_KINDS = ("color", "shape", "size", "count", "count_objects", "exists", "relation")


def vqa_kind(question):
    """Which of VQA_KINDS a question of vqa() asks (the evaluation reports VQA accuracy per kind)."""
    for prefix, kind in (("how many objects", "count_objects"), ("how many", "count"), ("is there", "exists"),
                         ("where is", "relation"), ("what color", "color"), ("what shape", "shape"),
                         ("what size", "size")):
        if question.startswith(prefix):
            return kind
    raise ValueError(f"not a shapes VQA question: {question!r}")


def edit(scene, rng, split="train", resolution=32, max_objects=None):
    """(instruction, new_scene): recolour, move (against an edge), add, or remove one object.

    The new scene keeps every other object where it was. An added object's position is free
    (listed in new_scene.free), so score_edit does not check it. Raises ValueError in the rare scene
    where no edit applies (look-alike objects, no room to add); callers draw another scene.
    """
    objs = list(scene.objects)
    max_objects = max_objects or max_objects_for(resolution)
    pairs = allowed_pairs(split)
    cands = []
    for i, o in enumerate(objs):
        ref = _reference(o, objs)
        if ref is None:
            continue
        for c in COLORS:
            if c != o.color and (c, o.shape) in pairs:
                cands.append((f"make the {ref} {c}", ("recolor", i, c)))
        for d in DIRECTIONS:
            cands.append((f"move the {ref} to the {d}", ("move", i, d)))
        if len(objs) > 1:
            cands.append((f"remove the {ref}", ("remove", i, None)))
    if len(objs) < max_objects:
        cands.append((None, ("add", None, None)))
    order = rng.permutation(len(cands))
    for k in order:
        text, (op, i, arg) = cands[k]
        if op == "recolor":
            new = objs[:i] + [replace(objs[i], color=arg)] + objs[i + 1:]
            return text, Scene(tuple(new))
        if op == "remove":
            return text, Scene(tuple(objs[:i] + objs[i + 1:]))
        if op == "move":
            o = objs[i]
            lo, hi = o.side / 2 + BORDER, 1 - o.side / 2 - BORDER
            moved = replace(o, **{"left": {"x": lo}, "right": {"x": hi}, "top": {"y": lo}, "bottom": {"y": hi}}[arg])
            rest = objs[:i] + objs[i + 1:]
            if abs(moved.x - o.x) + abs(moved.y - o.y) >= 0.2 and all(_separated(moved, p) for p in rest):
                return text, Scene(tuple(objs[:i] + [moved] + objs[i + 1:]))
        if op == "add":
            color, shape = pairs[rng.integers(len(pairs))]
            size = ("small", "large")[rng.integers(2)]
            pos = _place(rng, size, objs)
            if pos is not None:
                new = Obj(shape, color, size, *pos)
                return f"add a {_phrase(new)}", Scene(tuple(objs + [new]), free=(len(objs),))
    # only look-alikes that no phrase tells apart, and no room to add one: draw another scene
    raise ValueError(f"no edit applies to {scene}")


def random_edit(rng, split="train", resolution=32, max_objects=None):
    """(scene, instruction, new_scene): a random scene and an edit of it (re-drawn if none applies)."""
    while True:
        scene = random_scene(rng, split, resolution, max_objects)
        try:
            return (scene,) + edit(scene, rng, split, resolution, max_objects)
        except ValueError:
            continue


def scene_has_heldout(scene):
    return any((o.color, o.shape) in HELDOUT_PAIRS for o in scene.objects)


# ----------------------------------------------------------------------------- the oracle

def _to_uint8(image):
    """PIL image, uint8 (H, W, 3) array, or a float tensor / array in [-1, 1] ((3, H, W) or (H, W, 3))."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip((a.astype(np.float32) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return a


def _components(mask):
    """4-connected components of a boolean mask: (H, W) int array, 0 = background, labels 1..K."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        m = lab.copy()
        np.minimum(m[1:], lab[:-1], out=m[1:])
        np.minimum(m[:-1], lab[1:], out=m[:-1])
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        m = np.where(mask, m, big)
        # pointer jumping: a label is the index of a pixel in the same component, follow it
        flat = np.concatenate([[big], m.ravel(), [big]])
        m = np.where(mask, np.minimum(m, flat[np.minimum(m, big)]), big)
        if np.array_equal(m, lab):
            break
        lab = m
    uniq, inv = np.unique(np.where(mask, lab, 0), return_inverse=True)
    return inv.reshape(h, w) if uniq[0] == 0 else inv.reshape(h, w) + 1


def _hue_name(rgb):
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255))
    h = h * 360
    return min(HUES, key=lambda c: min(abs(h - HUES[c]), 360 - abs(h - HUES[c])))


def _features(a):
    """Per object: (core pixels ys, xs, soft area, 3rd central moment in y, 4th cumulant of the
    marginals / area^2, mean colour). Blur-robust by construction:
    alpha = chroma / palette chroma is the pixel's coverage (blending with grey scales chroma
    linearly), so the soft area and the third central moment of the coverage are unchanged by any
    symmetric blur (cumulants of a convolution add; a symmetric kernel's third one is 0, a Gaussian's
    fourth one too)."""
    chroma = a.max(-1) - a.min(-1)
    alpha = chroma / min(max(c) - min(c) for c in PALETTE.values())
    lab = _components(alpha > 0.5)
    core = lab.copy()
    for _ in range(2):  # grow each object into its soft, blurred rim
        grow = np.zeros_like(lab)
        grow[1:] = np.maximum(grow[1:], lab[:-1])
        grow[:-1] = np.maximum(grow[:-1], lab[1:])
        grow[:, 1:] = np.maximum(grow[:, 1:], lab[:, :-1])
        grow[:, :-1] = np.maximum(grow[:, :-1], lab[:, 1:])
        lab = np.where((lab == 0) & (alpha > 0.1), grow, lab)
    out = []
    for k in range(1, core.max() + 1):
        ys, xs = np.nonzero(core == k)
        ry, rx = np.nonzero(lab == k)
        w = np.clip(alpha[ry, rx], 0, 1)
        area = w.sum()
        my, mx = (w * ry).sum() / area, (w * rx).sum() / area
        skew = (w * (ry - my) ** 3).sum() / area
        # fourth cumulant of the x and y marginals per area^2: -1/120 for a square, -1/(16 pi^2) circle
        k4 = sum((w * d ** 4).sum() / area - 3 * ((w * d ** 2).sum() / area) ** 2 for d in (ry - my, rx - mx))
        out.append((ys, xs, area, skew, k4 / 2 / area ** 2, a[ys, xs].mean(0)))
    return out


def read_objects(image, min_area=0.2, strict=False):
    """Read an image back into Obj's (sorted left to right).

    Foreground: coverage (chroma / palette chroma) above 0.5; one object per 4-connected component
    larger than `min_area` times the smallest object's area (drops specks of noise). Shape from the
    blur-invariant cumulants of the coverage: a triangle's is skewed towards its apex; a square's
    marginals are flatter (fourth cumulant / area^2 = -1/120) than a circle's (-1/(16 pi^2)).
    strict: like a detector, see only flat-coloured blobs no larger than the largest shape, and return
    None when over 5% of the image is foreground that no object explains (noise, smears).
    """
    a = _to_uint8(image).astype(np.float32)
    res = a.shape[0]
    smallest = 0.5 * (SIZES["small"] * res) ** 2  # a small triangle
    largest = 1.3 * (SIZES["large"] * res) ** 2   # a large square, with a blurred rim
    objs, explained = [], 0
    for ys, xs, area, skew, kurt, rgb in _features(a):
        if len(ys) < min_area * smallest:
            continue
        if strict and (len(ys) > largest or _hue_spread(a[ys, xs]) > 20):
            continue
        explained += len(ys)
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if skew / area ** 1.5 < -0.01:  # upright triangle: -(2 ** 1.5) / 135 = -0.021
            shape = "triangle"
        else:  # square -1/120 = -0.0083, circle -1/(16 pi^2) = -0.0063
            shape = "square" if kurt < -0.0074 else "circle"
        size = "small" if max(w, h) / res < sum(SIZES.values()) / 2 else "large"
        objs.append(Obj(shape, _hue_name(rgb), size,
                        float((xs.min() + xs.max() + 1) / 2 / res), float((ys.min() + ys.max() + 1) / 2 / res)))
    if strict:
        chroma = a.max(-1) - a.min(-1)
        foreground = (chroma / min(max(c) - min(c) for c in PALETTE.values()) > 0.5).sum()
        if foreground - explained > 0.05 * res * res:
            return None
    return sorted(objs, key=lambda o: (o.x, o.y))


def _hue_spread(pixels):
    """Mean angular distance (degrees) of the pixels' hues from their circular mean: ~0 for a flat
    colour, ~90 for noise."""
    rgb = pixels / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.maximum(mx - mn, 1e-6)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    h = np.where(mx == r, (g - b) / d % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) * 60
    ang = np.deg2rad(h)
    mean = np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())
    diff = np.abs((ang - mean + np.pi) % (2 * np.pi) - np.pi)
    return float(np.rad2deg(diff).mean())


def _matches(o, want):
    return all(want.get(k) is None or getattr(o, k) == want[k] for k in ("shape", "color", "size"))


def satisfies(objs, spec):
    """Do these objects (ground truth or read_objects output) satisfy a prompt spec?

    spec: {'objects': [{'shape', 'color' or None, 'size' or None}, ...], 'count': n or None
    (exactly n objects match objects[0]), 'relation': 'above' etc. or None (objects[0] relative to
    objects[1]), 'exact': no other objects may be present}.
    """
    want = spec["objects"]
    if spec.get("exact") and len(objs) != (spec["count"] or len(want)):
        return False
    if spec.get("count") is not None:
        return sum(_matches(o, want[0]) for o in objs) == spec["count"]
    for chosen in itertools.permutations(objs, len(want)):
        if all(_matches(o, w) for o, w in zip(chosen, want)) and \
                (spec.get("relation") is None or relation(chosen[0], chosen[1]) == spec["relation"]):
            return True
    return False


def score_image(image, spec):
    """GenEval-style: does a generated image satisfy its prompt's spec? Noise or smeared colour fails,
    as it would for GenEval's detector (read_objects(strict=True))."""
    objs = read_objects(image, strict=True)
    return objs is not None and satisfies(objs, spec)


def parse_caption(text):
    """(objects, relation): objects as dicts of size / color / shape (None when unsaid) and
    relation as (i, j, word) between object i and j, or None. 'two circles' gives two objects."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    objs, rel, cur, count, pending = [], None, {}, 1, None
    singular = {_plural(s): s for s in SHAPES}
    for i, w in enumerate(words):
        if w in SIZES:
            cur["size"] = w
        elif w in HUES:
            cur["color"] = w
        elif w in NUMBERS:
            count = NUMBERS.index(w)
        elif w in SHAPES or w in singular:
            for _ in range(count if w in singular else 1):
                objs.append({"size": cur.get("size"), "color": cur.get("color"), "shape": singular.get(w, w)})
            if pending is not None and rel is None:
                rel = (pending, len(objs) - 1, pending_word)
            cur, count, pending = {}, 1, None
        elif w in ("above", "below") or (w in ("left", "right") and words[i + 1:i + 2] == ["of"]):
            if objs:
                pending, pending_word = len(objs) - 1, w if w in ("above", "below") else w + " of"
    return objs, rel


def parse_prompt(text):
    """The spec of any prompt in this dataset's language, so score_image can check free-form prompts:
    'two circles' -> count 2. Exact (no other objects), as every prompt of this dataset names all of
    its scene's objects."""
    objs, rel = parse_caption(text)
    words = text.lower().split()
    spec = {"objects": [dict(o) for o in objs], "count": None, "relation": None, "exact": bool(objs)}
    numbers = [w for w in words if w in NUMBERS]
    if numbers and objs:
        spec["objects"], spec["count"] = [dict(objs[0])], NUMBERS.index(numbers[0])
        return spec
    if rel is not None:  # relation between parsed objects i and j: name them first and second
        i, j, word = rel
        spec["objects"] = [dict(objs[i]), dict(objs[j])] + [dict(o) for k, o in enumerate(objs) if k not in (i, j)]
        spec["relation"] = word
    return spec


def score_caption(text, scene):
    """Attribute-level accuracy of a generated caption against the true scene, in [0, 1].

    Slots: size, colour and shape of every object (the larger of the true and the stated count), plus
    the relation when the scene has two objects or the caption states one. Stated objects are matched
    to true ones in the best order, so 'a blue square below a red circle' scores like the canonical one.
    """
    truth = list(scene.objects)
    pred, rel = parse_caption(text)
    slots = 3 * max(len(truth), len(pred)) + (1 if len(truth) == 2 or rel is not None else 0)
    best = 0
    for perm in itertools.permutations(range(len(truth)), min(len(pred), len(truth))):
        ok = sum(pred[i][k] == getattr(truth[t], k) for i, t in enumerate(perm) for k in ("size", "color", "shape"))
        if rel is not None and rel[0] < len(perm) and rel[1] < len(perm):
            ok += relation(truth[perm[rel[0]]], truth[perm[rel[1]]]) == rel[2]
        best = max(best, ok)
    return best / slots if slots else 1.0


def score_vqa(answer, truth):
    """Exact match of the first word after lowercasing ('2' counts as 'two')."""
    words = answer.lower().replace(".", " ").replace("?", " ").split()
    if not words:
        return False
    w = words[0]
    if w.isdigit() and int(w) < len(NUMBERS):
        w = NUMBERS[int(w)]
    return w == truth


def score_edit(image, target_scene, pos_tol=0.12):
    """Does an edited image show exactly the target scene: same objects (shape, colour, size), each
    within `pos_tol` of its target position except the free (added) ones?"""
    objs = read_objects(image)
    target = target_scene.objects
    if len(objs) != len(target):
        return False
    for perm in itertools.permutations(objs):
        if all(_matches(o, _want(t, True, True)) and
               (i in target_scene.free or max(abs(o.x - t.x), abs(o.y - t.y)) <= pos_tol)
               for i, (o, t) in enumerate(zip(perm, target))):
            return True
    return False


def objects_agree(read, truth, pos_tol=0.06):
    """Did read_objects recover the ground truth: same attributes and positions within pos_tol?"""
    if len(read) != len(truth):
        return False
    return any(all(o.shape == t.shape and o.color == t.color and o.size == t.size and
                   max(abs(o.x - t.x), abs(o.y - t.y)) <= pos_tol for o, t in zip(perm, truth))
               for perm in itertools.permutations(read))


# ----------------------------------------------------------------------------- evaluation sets

def eval_prompts(n_per_task=50, seed=0, split="test", resolution=32, max_objects=None):
    """Held-out text-to-image prompts, n_per_task for each GenEval task.

    Each: {'task', 'prompt', 'spec', 'heldout' (names a HELDOUT_PAIRS combination), 'scene' (one
    scene that satisfies it: a reference image)}. Prompts come from scenes of the held-out split, so
    each is drawable at this resolution; for colors / color_attr a third of the prompts are forced to
    use a held-out colour-shape pair.
    """
    max_objects = max_objects or max_objects_for(resolution)
    out = []
    for t, task in enumerate(TASKS):
        for i in range(n_per_task):
            rng = np.random.default_rng([int(seed), SPLITS[split], 1000 + t, i])
            force = task in ("colors", "color_attr") and i % 3 == 0
            n = 1 if task in ("single_object", "colors") else 2
            for _ in range(1000):
                if task == "counting":
                    n = int(rng.integers(2, max_objects + 1))
                    shape = SHAPES[rng.integers(len(SHAPES))]
                    pairs = [(c, shape) for c in COLORS]
                else:
                    pairs = list(HELDOUT_PAIRS) if force else None
                scene = random_scene(rng, split, resolution, max_objects, n, pairs=pairs)
                if task == "color_attr" and force and len(scene.objects) == 2:
                    # one held-out object and one from the rest
                    other = random_scene(rng, "train", resolution, max_objects, 2)
                    scene = Scene((scene.objects[0], replace(scene.objects[1], color=other.objects[0].color,
                                                             shape=other.objects[0].shape)))
                if len(scene.objects) == n and task in prompt_tasks(scene):
                    break
            prompt, spec = task_prompt(scene, task, rng)
            heldout = any(f"{c} {s}" in prompt for c, s in HELDOUT_PAIRS)
            out.append({"task": task, "prompt": prompt, "spec": spec, "heldout": heldout, "scene": scene})
    return out


def eval_scenes(n=200, seed=0, split="test", resolution=32, max_objects=None):
    """Held-out scenes for understanding and editing eval: dicts with scene, image (PIL), caption,
    question, answer, instruction, target (the edited Scene), target_image, heldout."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), SPLITS[split], 2000, i])
        scene, instr, target = random_edit(rng, split, resolution, max_objects)
        q, a = vqa(scene, rng, split)
        out.append({"scene": scene, "image": render(scene, resolution), "caption": caption(scene),
                    "question": q, "answer": a, "instruction": instr, "target": target,
                    "target_image": render(target, resolution), "heldout": scene_has_heldout(scene)})
    return out

# ----------------------------------------------------------------------------- the oracle's driver

@torch.no_grad()
def evaluate_shapes(model, vae, n_per_task=50, seed=0, log=print, **sampling):
    """The oracle on the held-out split: GenEval-style generation accuracy per task, caption, VQA, edit.
    sampling: generate_images' keyword arguments (num_iter, guidance, temperature, diffusion_steps)."""
    from vae import from_pil
    res, dev = model.cfg.image_size, model.llm.embed_tokens.weight.device
    g = torch.Generator(dev).manual_seed(seed)
    gen = lambda texts, und=None: torch.cat([
        vae.decode(model.generate_images(texts[i:i + 64], und_images=None if und is None else und[i:i + 64],
                                         generator=g, **sampling)).float().cpu()
        for i in range(0, len(texts), 64)])
    out = {}
    prompts = eval_prompts(n_per_task, seed=seed, split="test", resolution=res)
    images = gen([p["prompt"] for p in prompts])
    hits = [score_image(im, p["spec"]) for im, p in zip(images, prompts)]      # each image scored once

    def mean(keep, scores, items):       # mean score over the items that `keep` selects
        xs = [x for x, item in zip(scores, items) if keep(item)]
        return sum(xs) / max(1, len(xs))
    for task in TASKS:
        out[f"gen/{task}"] = mean(lambda p: p["task"] == task, hits, prompts)
    out["gen_accuracy"] = sum(out[f"gen/{t}"] for t in TASKS) / len(TASKS)
    for name, held in (("gen_heldout_pairs", True), ("gen_seen_pairs", False)):   # colors / color_attr prompts:
        out[name] = mean(lambda p: p["task"] in ("colors", "color_attr") and p["heldout"] == held,  # compositions
                         hits, prompts)                              # never seen in training vs seen ones
    log(f"eval: generation {out['gen_accuracy']:.3f} on {len(prompts)} held-out prompts")
    scenes = eval_scenes(2 * n_per_task, seed=seed, split="test", resolution=res)
    und = from_pil([s["image"] for s in scenes], res)
    text = lambda prompts: [t for i in range(0, len(prompts), 128) for t in model.generate_text(
        und[i:i + 128], prompts[i:i + 128], max_new_tokens=model.cfg.max_text_len)]
    caps = text([""] * len(scenes))       # captioning reads no prompt (data/__init__.py)
    cap_scores = [score_caption(c, s["scene"]) for c, s in zip(caps, scenes)]
    out["caption_accuracy"] = mean(lambda s: True, cap_scores, scenes)
    out["caption_heldout_pairs"] = mean(lambda s: s["heldout"], cap_scores, scenes)
    answers = text([s["question"] for s in scenes])
    vqa_hits = [score_vqa(a, s["answer"]) for a, s in zip(answers, scenes)]
    out["vqa_accuracy"] = sum(vqa_hits) / len(scenes)
    kinds = [vqa_kind(s["question"]) for s in scenes]
    for kind in sorted(set(kinds)):                                      # the kinds these scenes ask
        out[f"vqa/{kind}"] = mean(lambda k: k == kind, vqa_hits, kinds)
    edited = gen([s["instruction"] for s in scenes], und)
    out["edit_accuracy"] = sum(score_edit(im, s["target"]) for im, s in zip(edited, scenes)) / len(scenes)
    return out
