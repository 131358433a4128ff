"""
From datasets to the model's batches, as train.py reads them.

A step's global batch is grad_accum micro-batches, each read from its own data shard (the dataset's
rank / world_size sharding with world_size = grad_accum); process r of P owns shards r*k .. r*k+k-1,
k = grad_accum / P. Each micro-batch's random numbers are seeded from step_seed(seed, step, shard).
So what a step sees and computes depends neither on the number of processes nor on where a run was
resumed. Each micro-batch holds a fixed number of rows per task (rows_per_task), so every step's
batch has the same shape (one compiled graph) and the task mix holds in every micro-batch.

`args` below is anything with train.py's data flags: dataset, data_dir, resolution, seed, holdout (and for
the validation batches the task flags and batch_size).
"""
import atexit
import itertools
import signal
import weakref

import numpy as np
import torch

from unifluid import patchify

from . import build_dataset, task_mix, validation_note
from .imagetext import EmptySplit


def step_seed(seed, step, shard):
    return (seed * 1_000_003 + step) * 1_009 + shard


class ShardStream:
    """Endless examples of one shard, starting at example `start` (re-iterated by epochs if finite).
    A real dataset without a validation split validates on the part of it held out of training
    (--holdout); with --holdout 0, on its training split with another seed. `note` says which."""

    def __init__(self, args, split, shard, n_shards, start=0, tasks=None, seed=None):
        kw = dict(data_dir=args.data_dir, resolution=args.resolution, tasks=tasks, rank=shard, world_size=n_shards,
                  holdout=args.holdout)
        try:
            self.ds = build_dataset(args.dataset, split=split, seed=args.seed if seed is None else seed, **kw)
            self.note = validation_note(self.ds)
            if split != "train":
                next(iter(self.ds))      # the held-out part of a small dataset can be empty
        except (FileNotFoundError, EmptySplit) as e:
            if split == "train":
                raise
            self.ds = build_dataset(args.dataset, split="train", seed=args.seed + 1, **kw)
            why = "no validation split and --holdout 0" if isinstance(e, FileNotFoundError) else \
                f"the held-out part of this small dataset is empty: raise --holdout ({args.holdout:g})"
            self.note = f"validation: the training data under another seed ({why}), so it cannot show overfitting"
        self.it, self.shard = iter(self.ds), shard
        if start and hasattr(self.ds, "example") and getattr(self.ds, "num_samples", 0) is None:
            # shapes: example i is a pure function of i and shard s holds i = s, s + n, ...: jump there
            self.it = (self.ds.example(i) for i in itertools.count(shard + start * n_shards, n_shards))
        else:
            for _ in range(start):       # exact resume: skip what the run already saw
                self.next()

    def next(self):
        try:
            return next(self.it)
        except StopIteration:            # finite dataset: next epoch
            self.it = iter(self.ds)
        try:
            return next(self.it)
        except StopIteration:            # an empty epoch would repeat forever
            raise ValueError(f"the {self.ds.__class__.__name__} part for micro-batch shard {self.shard} holds no "
                             f"examples (fewer data shards than --grad_accum?)") from None

    def take(self, n):
        return [self.next() for _ in range(n)]

    def skipped(self):
        """Samples and shards the real-data reader skipped so far (the reasons are in self.ds.stats)."""
        return sum(c for r, c in getattr(self.ds, "stats", {}).items() if r != "samples")


class TaskStreams:
    """The examples of one micro-batch shard with a fixed number of rows per task, grouped by task: one
    ShardStream per task (each with its own seed), so every step's batch has the same shape and the
    compiled step is built once (torch.compile), and the task mix holds in every micro-batch."""

    def __init__(self, args, shard, n_shards, start_step, rows):
        self.rows = rows
        self.streams = {t: ShardStream(args, "train", shard, n_shards, start_step * n, {t: 1.0}, args.seed + 101 * k)
                        for k, (t, n) in enumerate(rows.items())}

    def take(self, n):
        assert n == sum(self.rows.values())
        return [e for t, s in self.streams.items() for e in s.take(self.rows[t])]

    def skipped(self):
        return sum(s.skipped() for s in self.streams.values())


class StepExamples(torch.utils.data.IterableDataset):
    """This process's examples, step after step: ([the micro-batch of each shard in `shards`], the samples
    the readers have skipped so far). A dataset error (FileNotFoundError, ValueError) is passed on as the
    next item, so that it reaches train.py as one sentence also from a worker process."""

    def __init__(self, args, shards, start_step, rows):
        self.args, self.shards, self.start_step, self.rows = args, list(shards), start_step, rows

    def __iter__(self):
        try:
            streams = [TaskStreams(self.args, s, self.args.grad_accum, self.start_step, self.rows) for s in self.shards]
            while True:
                yield [st.take(sum(self.rows.values())) for st in streams], sum(st.skipped() for st in streams)
        except (FileNotFoundError, ValueError) as e:
            yield e


def step_examples(args, shards, start_step, rows, workers=1):
    """An endless iterator over StepExamples. workers=1: a DataLoader worker process draws the next two
    steps' examples while this process computes (drawing scenes and decoding JPEGs are serial Python,
    which a second core runs beside the step); 0: drawn here, in turn with the step. The examples are the
    same either way. Images cross the process boundary as numpy arrays (pickled, no shared memory per
    tensor). Closing the iterator stops the worker; train.py closes it when the run ends (also on an
    error), and one still open is closed when Python exits."""
    feed = _step_examples(StepExamples(args, shards, start_step, rows), workers)
    if workers:
        _OPEN_FEEDS.add(feed)
    return feed


_OPEN_FEEDS = weakref.WeakSet()    # feeds with a worker process, for _close_open_feeds


@atexit.register                   # runs before multiprocessing's own exit handler, registered at torch's import
def _close_open_feeds():
    """The worker ignores SIGTERM, so Python's own exit (SIGTERM to each child, then join) cannot stop it."""
    for feed in list(_OPEN_FEEDS):
        feed.close()


def _step_examples(ds, workers):
    if workers:
        loader = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=2,
                                                  collate_fn=_as_arrays, worker_init_fn=_leave_signals_to_train,
                                                  generator=torch.Generator()))
        items = map(_as_tensors, loader)
    else:
        items = iter(ds)
    try:
        for item in items:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        if workers:
            loader._shutdown_workers()   # tells the worker to stop and waits for it (5 s)
            for w in loader._workers:    # one that did not stop: SIGKILL, which it cannot ignore
                if w.is_alive():
                    w.kill()
                    w.join()


def _leave_signals_to_train(worker_id):
    """Ctrl-C reaches the whole process group: train.py finishes the step (which needs its examples) and
    checkpoints; the worker ends with it, when train.py closes the iterator."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _as_arrays(item, convert=lambda v: v.numpy()):
    if isinstance(item, Exception):
        return item
    batches, skipped = item
    return [[{k: convert(v) if isinstance(v, (torch.Tensor, np.ndarray)) else v for k, v in e.items()} for e in b]
            for b in batches], skipped


def _as_tensors(item):
    return _as_arrays(item, torch.from_numpy)


def rows_per_task(mix, n):
    """Rows of each task in a micro-batch of n: the shares rounded to sum to n (largest remainder), at
    least one row per task with a share."""
    if n < len(mix):
        raise ValueError(f"--batch_size {n} cannot hold a row of each of the {len(mix)} tasks "
                         f"({', '.join(mix)}): raise --batch_size or drop a task")
    exact = {t: s * n for t, s in mix.items()}
    rows = {t: max(1, int(x)) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: int(exact[t]) - exact[t]):      # largest remainder first
        if sum(rows.values()) < n:
            rows[t] += 1
    while sum(rows.values()) > n:                                        # the max(1, .) took too many
        rows[max(rows, key=rows.get)] -= 1
    return rows


def encode_batch(model, vae, examples, device, generator=None, cfg_dropout=0.0, pad_multiple=1, sample=False):
    """Examples -> model tensors. Output images are VAE-encoded here (no grad), so the step time includes it,
    unless the examples carry their latents (--dataset latents: encoded once by `python vae.py --encode`).
    sample=True (training) takes a draw from the VAE posterior, as MAR does, instead of its mean."""
    cfg = model.cfg
    tasks = [e["task"] for e in examples]
    prompts = model.drop_prompts(tasks, [e["prompt"] for e in examples], cfg_dropout, generator)
    gen_rows = [i for i, t in enumerate(tasks) if t in ("t2i", "edit")]
    gen_tokens = None
    if gen_rows:
        if "output_latent" in examples[0]:
            lat = torch.stack([examples[i]["output_latent"] for i in gen_rows])
            if sample and "output_latent_std" in examples[0]:   # latents stored with their posterior's std
                std = torch.stack([examples[i]["output_latent_std"] for i in gen_rows])
                lat = lat + std * torch.randn(lat.shape, generator=generator)
            lat = lat.to(device)
        else:
            with torch.no_grad():
                lat = vae.encode(torch.stack([examples[i]["output_image"] for i in gen_rows]).to(device),
                                 sample=sample, generator=generator)
        tok = patchify(lat.float(), cfg.patch_size)                            # (G, N, Dt)
        gen_tokens = tok.new_zeros(len(examples), *tok.shape[1:])
        gen_tokens[gen_rows] = tok
    und = torch.stack([e["input_image"] for e in examples])
    gen_images = None
    if cfg.repa_weight > 0 and gen_rows:   # REPA aligns with the ViT's features of the output images
        gen_images = torch.stack([e["output_image"] for e in examples])
        if not gen_images[gen_rows].any():
            raise ValueError("repa_weight needs the output images, which these examples do not carry "
                             "(--dataset latents stores only latents): train on the images or set repa_weight=0")
    batch = model.make_batch(tasks, prompts, [e["answer"] for e in examples], gen_tokens, und, pad_multiple,
                             gen_images)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def fixed_examples(args, n_prompts=12, n_images=6):
    """The validation examples every sample interval of a run reuses: text-to-image prompts and (image,
    question) examples."""
    stream = ShardStream(args, "val", 0, 1, tasks={"t2i": 0.5, "caption": 0.25, "vqa": 0.25})
    prompts, und = [], []
    for _ in range(2000):
        e = stream.next()
        if e["task"] == "t2i" and len(prompts) < n_prompts:
            prompts.append(e["prompt"])
        elif e["task"] in ("caption", "vqa") and len(und) < n_images:
            und.append(e)
        if len(prompts) == n_prompts and len(und) == n_images:
            break
    return prompts, und


def val_batches(args, model, vae, device, n=8, log=None):
    """n fixed validation batches of the run's task mix (batch_size rows each)."""
    stream = ShardStream(args, "val", 0, 1, tasks=task_mix(args))
    if log:
        log(stream.note)
    return [encode_batch(model, vae, stream.take(args.batch_size), device) for _ in range(n)]


@torch.no_grad()
def val_losses(model, batches):
    """Mean image and text losses over fixed validation batches (fixed seeds: comparable across evals)."""
    li, lt, ni, nt = 0.0, 0.0, 0, 0
    for i, batch in enumerate(batches):
        torch.manual_seed(i)
        out = model(batch)
        if "gen_tokens" in batch:
            li, ni = li + out["loss_image"].item(), ni + 1
        if (batch["targets"] != -100).any():
            lt, nt = lt + out["loss_text"].item(), nt + 1
    return dict(val_loss_image=round(li / ni, 5) if ni else None, val_loss_text=round(lt / nt, 5) if nt else None)
