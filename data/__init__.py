"""Datasets for train.py: the embedded shapes scenes (data/shapes.py) and real image-text data
(data/imagetext.py: CC3M, CC12M, COCO, any WebDataset shards, img2dataset files, a TSV of paths);
data/streams.py reads them as train.py's per-shard streams and turns examples into model batches.

    ds = build_dataset('shapes', resolution=32, tasks={'t2i': 0.5, 'caption': 0.5})
    loader = DataLoader(ds, batch_size=64, num_workers=2)

Every example is a dict with the same five keys, so torch's default collate batches any mix of tasks:
    task          't2i' | 'caption' | 'vqa' | 'edit'
    input_image   (3, H, W) float in [-1, 1], the image the model reads (caption, vqa, edit), else zeros
    output_image  (3, H, W) float in [-1, 1], the image the model generates (t2i, edit), else zeros
    prompt        text the model reads: the caption (t2i), '' (caption), the question (vqa), the instruction (edit)
    answer        text the model writes: the caption (caption), a one-word answer (vqa), else ''
"""
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import shapes

TASK_NAMES = ("t2i", "caption", "vqa", "edit")
SHAPES_TASKS = {"t2i": 0.5, "caption": 0.2, "vqa": 0.3, "edit": 0.0}
REAL_TASKS = {"t2i": 0.8, "caption": 0.2}  # real image-text pairs have no questions or edits
REAL_DATASETS = ("cc3m", "cc12m", "coco", "wds", "files", "tsv")


def task_shares(tasks, default, supported=TASK_NAMES):
    """Normalised shares of the supported tasks; unsupported ones (vqa / edit on real data) dropped."""
    tasks = dict(default if tasks is None else tasks)
    unknown = set(tasks) - set(TASK_NAMES)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {TASK_NAMES}")
    if any(v < 0 for v in tasks.values()):
        raise ValueError(f"task shares must be >= 0, got {tasks}")
    kept = {t: float(v) for t, v in tasks.items() if t in supported and v > 0}
    if not kept:
        raise ValueError(f"no task left with a positive share among {list(supported)} (got {tasks})")
    total = sum(kept.values())
    return {t: v / total for t, v in kept.items()}


def task_mix(args):
    """A run's task shares from train.py's flags (--tasks, or --t2i --caption --vqa --edit), normalised;
    real image-text pairs have no questions or edits (data/README.md)."""
    shares = args.tasks if args.tasks is not None else {t: getattr(args, t) for t in TASK_NAMES}
    return task_shares(shares, None, TASK_NAMES if args.dataset == "shapes" else tuple(REAL_TASKS))


def pick_task(shares, rng):
    """One task drawn by its share (one uniform draw from rng)."""
    u, acc = rng.random(), 0.0
    for name, share in shares.items():
        acc += share
        if u < acc:
            return name
    return name  # u within rounding of 1.0


def to_tensor(img):
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
    return a.permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def make_example(task, resolution, input_image=None, output_image=None, prompt="", answer=""):
    """One example dict (the five keys above); missing images are zeros of the right shape."""
    zeros = lambda: torch.zeros(3, resolution, resolution)
    return {"task": task,
            "input_image": zeros() if input_image is None else to_tensor(input_image),
            "output_image": zeros() if output_image is None else to_tensor(output_image),
            "prompt": prompt, "answer": answer}


def worker_unit(rank=0, world_size=1):
    """(unit, units): this (rank, DataLoader worker)'s index among all of them. Work item k goes to
    unit k % units, so ranks and workers see disjoint parts that together cover everything."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * nw + wid, world_size * nw


class ShapesDataset(IterableDataset):
    """Shapes examples; example(i) depends only on (seed, split, i), so any number of workers and
    ranks together yield the same samples (each index once). Infinite unless num_samples is given."""

    def __init__(self, split="train", resolution=32, seed=0, tasks=None, rank=0, world_size=1,
                 num_samples=None, max_objects=None, full_caption_prob=0.5):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(shapes.SPLITS)}")
        self.split, self.resolution, self.seed = split, resolution, seed
        self.shares = task_shares(tasks, SHAPES_TASKS)
        self.rank, self.world_size, self.num_samples = rank, world_size, num_samples
        self.max_objects = max_objects or shapes.max_objects_for(resolution)
        self.full_caption_prob = full_caption_prob

    def example(self, index):
        rng = shapes.rng_for(self.seed, self.split, index)
        task = pick_task(self.shares, rng)
        R = self.resolution
        if task == "edit":
            before, instruction, after = shapes.random_edit(rng, self.split, R, self.max_objects)
            return make_example(task, R, input_image=shapes.render(before, R), output_image=shapes.render(after, R),
                                prompt=instruction)
        scene = shapes.random_scene(rng, self.split, R, self.max_objects)
        if task == "t2i":
            prompt, _ = shapes.t2i_prompt(scene, rng, self.full_caption_prob)
            return make_example(task, R, output_image=shapes.render(scene, R), prompt=prompt)
        if task == "caption":
            return make_example(task, R, input_image=shapes.render(scene, R), answer=shapes.caption(scene))
        q, a = shapes.vqa(scene, rng, self.split)  # task == 'vqa'
        return make_example(task, R, input_image=shapes.render(scene, R), prompt=q, answer=a)

    def __iter__(self):
        unit, units = worker_unit(self.rank, self.world_size)
        i = unit
        while self.num_samples is None or i < self.num_samples:
            yield self.example(i)
            i += units


def validation_note(ds):
    """One line for the log: where the samples of this validation stream come from."""
    if getattr(ds, "holdout", 0):
        return (f"validation: the {ds.holdout:.1%} of samples held out of training by a hash of their key "
                f"(--holdout {ds.holdout:g}); training never reads them")
    return "validation: the dataset's own validation split"


def build_dataset(name, data_dir=None, split="train", resolution=32, seed=0, tasks=None, rank=0,
                  world_size=1, **kwargs):
    """The IterableDataset train.py reads. name: 'shapes' (embedded, no files) or one of
    REAL_DATASETS with data_dir (see data/README.md). tasks: shares per task, None = the dataset's
    default. kwargs go to the dataset class: shapes num_samples (None = endless), max_objects,
    full_caption_prob; real data shuffle, shuffle_buffer, epochs, max_pixels, max_bytes, holdout (the share
    held out for validation where the data has no validation split; data/imagetext.py). 'latents' with
    data_dir = a folder of pre-encoded latents (data/latents.py) yields an extra key, output_latent."""
    if name == "shapes":
        kwargs.pop("holdout", None)  # shapes has a held-out split of its own (distinct seeds and pairs)
        return ShapesDataset(split, resolution, seed, tasks, rank, world_size, **kwargs)
    if name == "latents":  # pre-encoded VAE latents of a real dataset (data/latents.py)
        from .latents import LatentDataset
        return LatentDataset(data_dir, split, resolution, seed, task_shares(tasks, REAL_TASKS, ("t2i", "caption")),
                             rank, world_size, **kwargs)
    if name in REAL_DATASETS:
        from .imagetext import build_imagetext
        return build_imagetext(name, data_dir, split, resolution, seed, task_shares(tasks, REAL_TASKS, ("t2i", "caption")),
                               rank, world_size, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; expected shapes, latents or one of {REAL_DATASETS}")


def text_corpus(name, data_dir=None, n=2000, seed=0, holdout=None):
    """Sample texts (prompts and answers) to build the word vocabulary from. For shapes it covers
    every word the dataset can emit (training texts, eval prompts, questions, answers, edits); for real
    data, the training part only (holdout: as build_dataset's, None = the reader's default)."""
    hold = {} if holdout is None else {"holdout": holdout}
    if name == "shapes":
        out = [" ".join(shapes.WORDS)]  # guarantees full coverage whatever n is
        for i in range(n):
            rng = np.random.default_rng([int(seed), 99, i])
            res = 64 if i % 4 == 0 else 32  # 64 px scenes hold 3-4 objects: 'three', 'four'
            scene = shapes.random_scene(rng, "test", res)
            kind = i % 4
            if kind == 0:
                out.append(shapes.caption(scene))
            elif kind == 1:
                out.append(shapes.t2i_prompt(scene, rng, 0.0)[0])
            elif kind == 2:
                out.extend(shapes.vqa(scene, rng, "test"))
            else:
                out.append(shapes.random_edit(rng, "test", res)[1])
        return out[:max(n, 1)]
    if name == "latents":
        from .latents import LatentDataset
        return LatentDataset(data_dir, shuffle=False, **hold).captions(n)
    if name in REAL_DATASETS:
        from .imagetext import caption_corpus
        return caption_corpus(name, data_dir, n, seed, **hold)
    raise ValueError(f"unknown dataset {name!r}; expected shapes or one of {REAL_DATASETS}")
