"""Pre-encoded VAE latents of a real image-text dataset, as MAR's main_cache.py does: the VAE encoder
runs once per image instead of once per image per epoch.

    python vae.py --encode --vae sd:VAE_DIR --dataset cc3m --data_dir DIR --resolution 256 --out_dir LATENTS
    python train.py --dataset latents --data_dir LATENTS --model base          # --vae, --resolution: from LATENTS

LATENTS holds `meta.json` (the VAE spec, resolution, latent shape, sample counts) and shards
`{split}-{k:05d}.pt`, each a dict of
    latents   (n, C, h, w) float16 (or float32)  the VAE posterior's mean, scaled
    latent_std (n, C, h, w) same dtype            its standard deviation, scaled: training draws from the
                                                  posterior, as MAR does with its cached moments
    images    (n, 3, R, R) uint8                  the image at training resolution (the ViT reads it)
    captions  list of n: a str, or a list of str (COCO's ~5 per image, one drawn per epoch as the reader does)
    keys      list of n source sample keys
LatentDataset yields the example dicts of data/__init__.py plus `output_latent` (C, h, w) float32 (zeros
for captioning rows): data/streams.py's encode_batch uses it instead of running the VAE. `output_image` is zeros
(the latent replaces it). Shards, shuffling, task draws and bad-shard handling are ImageTextDataset's, so a
latent shard and the tar shard it came from yield the same stream of examples.
"""
import glob
import json
import os

import torch

from .imagetext import HOLDOUT, README, ImageTextDataset, build_imagetext, is_heldout
from . import pick_task

ENCODE = "python vae.py --encode --vae VAE --dataset NAME --data_dir DIR --resolution R --out_dir LATENT_DIR"


def read_meta(latent_dir):
    """meta.json of a latent folder, or FileNotFoundError saying how to make one."""
    path = os.path.join(latent_dir or "", "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--data_dir {latent_dir} holds no meta.json of pre-encoded latents: "
                                f"make them with `{ENCODE}`")
    with open(path) as f:
        return json.load(f)


def _read_shard(path, max_bytes=None):
    """A latent shard -> raw samples {'__key__', 'latent', 'latent_std', 'image', 'txt' or 'captions'}."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
        lat, img, caps, keys = shard["latents"], shard["images"], shard["captions"], shard["keys"]
    except FileNotFoundError:
        return [{"__key__": path, "__error__": "missing_shard"}]
    except Exception:  # torn or foreign file
        return [{"__key__": path, "__error__": "truncated_shard"}]
    std = shard.get("latent_std")     # absent in folders encoded before it was stored: train on the mean
    return [{"__key__": k, "latent": lat[i], "image": img[i], "captions" if isinstance(c, list) else "txt": c,
             **({} if std is None else {"latent_std": std[i]})} for i, (k, c) in enumerate(zip(keys, caps))]


class LatentDataset(ImageTextDataset):
    """Examples from the shards of a latent folder (see the module docstring)."""

    def __init__(self, latent_dir, split="train", resolution=None, seed=0, shares=None, rank=0, world_size=1,
                 holdout=HOLDOUT, **kwargs):
        self.meta = read_meta(latent_dir)
        if resolution and resolution != self.meta["resolution"]:
            raise ValueError(f"the latents in {latent_dir} were encoded from {self.meta['resolution']} px images, "
                             f"not {resolution}: drop --resolution, or encode again at {resolution}")
        train = split == "train"
        # a source without a validation split was encoded whole into train-*.pt: the held-out part is
        # taken from it by key, exactly as the image reader takes it from the source
        self.own_split = self.meta.get("own_val_split", bool(glob.glob(os.path.join(latent_dir, "val-*.pt"))))
        if self.own_split:
            holdout = 0.0
        elif not train and not holdout:
            raise FileNotFoundError(f"{latent_dir} has no validation split and --holdout is 0, so nothing is held out")
        part = split if self.own_split else "train"
        items = sorted(glob.glob(os.path.join(latent_dir, f"{part}-*.pt")))
        if not items:
            raise FileNotFoundError(f"no {part}-*.pt shards in {latent_dir}: make them with `{ENCODE} --split {part}`")
        kwargs.setdefault("shuffle", train)
        kwargs.setdefault("epochs", None if train else 1)
        super().__init__(items, _read_shard, items.__getitem__, self.meta["resolution"], seed, shares, rank,
                         world_size, holdout=holdout, heldout=not train, **kwargs)
        self.zero_latent = torch.zeros(self.meta["latent_shape"])

    def example(self, sample, rng):
        """Same draws from rng as ImageTextDataset.example: a caption of a list, then the task."""
        text = sample["captions"][int(rng.integers(len(sample["captions"])))] if "captions" in sample \
            else sample["txt"]
        R = self.resolution
        zeros = torch.zeros(3, R, R)
        # training draws from the VAE posterior, as MAR does with its cached moments (folders encoded before
        # the std was stored train on the mean); every row carries the same keys, so batches collate
        t2i = pick_task(self.shares, rng) == "t2i"
        std = {} if "latent_std" not in sample else \
            {"output_latent_std": sample["latent_std"].float() if t2i else self.zero_latent.clone()}
        if t2i:
            return {"task": "t2i", "input_image": zeros, "output_image": zeros.clone(),
                    "output_latent": sample["latent"].float(), "prompt": text, "answer": "", **std}
        image = sample["image"].float().div_(127.5).sub_(1.0)          # as data.to_tensor
        return {"task": "caption", "input_image": image, "output_image": zeros,
                "output_latent": self.zero_latent.clone(), "prompt": "", "answer": text, **std}

    def pairs(self):
        """(key, caption or [captions], uint8 (3, R, R) image) of this split, in order (as the image reader's)."""
        for sample in self.raw_samples(0, 0, 1):
            yield sample["__key__"], sample["captions"] if "captions" in sample else sample["txt"], sample["image"]

    def captions(self, n):
        out = []
        for item in self.items:
            for s in _read_shard(item):
                if "__error__" not in s and not (self.holdout and is_heldout(s["__key__"], self.holdout)):
                    out.extend(s["captions"] if "captions" in s else [s["txt"]])
            if len(out) >= n:
                break
        return out[:n]


@torch.no_grad()
def encode_dataset(vae, vae_spec, name, data_dir, out_dir, split="train", resolution=256, batch_size=64,
                   shard_size=2000, dtype=torch.float16, device="cpu", log=print):
    """Encode every image of `name` at `data_dir` once into out_dir/{split}-*.pt + meta.json (merged with
    other splits' entries). Returns the number of samples written."""
    if resolution % vae.downsample:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE downsampling {vae.downsample}")
    meta_path = os.path.join(out_dir, "meta.json")
    meta = read_meta(out_dir) if os.path.exists(meta_path) else {}
    if meta and (meta["vae"], meta["resolution"]) != (vae_spec, resolution):
        raise ValueError(f'{out_dir} holds latents of another VAE or resolution ({meta["vae"]}, {meta["resolution"]} '
                         f"px): use a new --out_dir")
    # everything of the split, held-out part included: the latent reader holds the same part out by key
    try:
        source = build_imagetext(name, data_dir, split, resolution, shuffle=False, epochs=1, holdout=0)
    except FileNotFoundError:
        if split == "train":
            raise
        raise FileNotFoundError(f"{data_dir} has no validation split of its own: encode --split train only; "
                                f"train.py holds part of it out by key (--holdout)") from None
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, f"{split}-*.pt")):   # a re-encode replaces the split
        os.remove(old)
    shard, batch, n, k = dict(latents=[], latent_std=[], images=[], captions=[], keys=[]), [], 0, 0

    def flush_batch():
        images = torch.stack([b[2] for b in batch])
        mean, logvar = vae.posterior(images.to(device).float().div_(127.5).sub_(1.0))
        shard["latents"].append((mean * vae.scale_factor).to("cpu", dtype))
        shard["latent_std"].append((torch.exp(0.5 * logvar) * vae.scale_factor).to("cpu", dtype))
        shard["images"].append(images)
        shard["captions"] += [b[1] for b in batch]
        shard["keys"] += [b[0] for b in batch]
        batch.clear()

    def write_shard():
        nonlocal k
        path = os.path.join(out_dir, f"{split}-{k:05d}.pt")
        torch.save({key: torch.cat(v) if key in ("latents", "latent_std", "images") else v for key, v in shard.items()},
                   path + ".tmp")
        os.replace(path + ".tmp", path)
        log(f'{path}: {len(shard["keys"])} samples ({n} so far)')
        for v in shard.values():
            v.clear()
        k += 1

    for sample in source.pairs():
        batch.append(sample)
        n += 1
        if len(batch) == batch_size or len(shard["keys"]) + len(batch) == shard_size:
            flush_batch()
        if len(shard["keys"]) == shard_size:
            write_shard()
    if batch:
        flush_batch()
    if shard["keys"]:
        write_shard()
    if n == 0:
        raise ValueError(f"no readable sample in {name} at {data_dir} ({split}); see {README}")
    h = resolution // vae.downsample
    meta.update(vae=vae_spec, resolution=resolution, latent_shape=[vae.latent_channels, h, h],
                dtype=str(dtype).replace("torch.", ""), scale_factor=vae.scale_factor, source=name,
                own_val_split=source.own_split)
    meta.setdefault("splits", {})[split] = dict(data_dir=data_dir, shards=k, samples=n,
                                                skipped={r: c for r, c in source.stats.items() if r != "samples"})
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return n
