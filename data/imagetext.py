"""Real image-text pairs: CC3M, CC12M, COCO captions, any WebDataset shards, img2dataset's `files`
layout, or a TSV/CSV of local image paths and captions (data/README.md says how to get
them onto disk).

    ds = build_dataset('cc3m', data_dir='/data/cc3m', resolution=256)   # t2i 0.8, caption 0.2

Layouts
  wds    WebDataset tar shards (img2dataset, Hugging Face cc3m-wds): a directory of .tar files, a glob
         ('/d/*.tar'), a brace pattern ('/d/{00000..00331}.tar') or one .tar. A sample is the run of
         members sharing the path up to the first dot of the file name: KEY.jpg + KEY.txt (+ KEY.json).
         Read with the standard library's tarfile in streaming mode ('r|*', so .tar.gz works too).
  files  img2dataset --output_format files: DIR/00000/KEY.jpg + KEY.txt (or the files directly in DIR).
  tsv    a .tsv/.csv of local image paths and captions (header optional; relative paths are taken
         from the file's directory). The official CC3M/CC12M lists hold only captions and URLs: they
         are recognised and rejected with a pointer to data/README.md.
  coco   DIR/annotations/captions_{train,val}2017.json + DIR/{train,val}2017/*.jpg; one sample per
         image, one of its ~5 captions drawn at random each time.
  cc3m, cc12m pick whichever of the above DIR holds (for Hugging Face shards, the split's files).

Work is split by items (a shard, a sub-directory, or a record of a TSV / COCO list): after the epoch's
seeded shuffle, item k goes to (rank, worker) unit k % units, so units read disjoint parts that cover
every sample once per epoch. Train streams are shuffled twice: the item order per epoch, and a buffer
of raw samples (bytes, decoded after the buffer so it costs little memory).

Bad samples are skipped, counted in `dataset.stats` (per reason) and warned about with the shard's
name: corrupt or missing image, missing / empty / non-UTF-8 caption, an image over `max_pixels`
(decompression bomb), a member over `max_bytes`, a truncated or unreadable shard, a shard deleted
mid-run (missing_shard). A dataset where every sample is bad raises ValueError after one pass instead
of looping forever. The counters live in
the process that reads: with DataLoader workers each worker counts its own (and warns).
"""
import csv
import functools
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import warnings
import zlib
from collections import Counter

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import IterableDataset

from . import make_example, pick_task, worker_unit

README = "data/README.md"
HOLDOUT = 0.02  # share of a dataset without a validation split that is held out of training (train.py --holdout)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTS = ("txt", "caption", "text")
PATH_COLUMNS = ("filepath", "file_path", "image_path", "path", "file", "filename", "file_name", "image", "img", "jpg")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "prompt", "description")
URL_RE = re.compile(r"^\s*https?://", re.I)


class DataWarning(UserWarning):
    """A skipped sample or shard while reading real data."""


class EmptySplit(ValueError):
    """No sample of a small dataset falls in the part (held-out or training) that a stream reads."""


class Skip(Exception):
    """This sample cannot be used; args[0] is the reason counted in dataset.stats."""


def _no_images(path):
    return ValueError(
        f"{path} is a CC3M/CC12M-style list of captions and image URLs: it holds no images. Download the "
        f"images with img2dataset (see {README}) and point --data_dir at its output folder.")


# ----------------------------------------------------------------------------- images

def to_rgb(img):
    """Any Pillow mode -> RGB: 16-bit and float grey rescaled, transparency composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float32)
        if a.max() > 255:  # 16-bit
            a = a / 257.0
        elif img.mode == "F" and a.max() <= 1.0:
            a = a * 255.0
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def resize_center_crop(img, resolution):
    """Shorter side to `resolution` (antialiased bicubic), then the centre square."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    x, y = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((x, y, x + resolution, y + resolution))


def decode_image(data, resolution, max_pixels):
    """Encoded bytes -> RGB PIL image of resolution x resolution, or Skip(reason)."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError:
        raise Skip("oversized_image")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise Skip("corrupt_image")
    if w * h > max_pixels:
        raise Skip("oversized_image")
    try:
        if img.format == "JPEG":
            img.draft("RGB", (resolution, resolution))  # decode at the smallest DCT scale >= the target
        img.load()
        return resize_center_crop(to_rgb(img), resolution)
    except Exception:  # a damaged file fails in many ways inside the decoders (OSError, struct.error, ...)
        raise Skip("corrupt_image")


def decode_caption(sample):
    """The caption of a raw sample (txt member, or a json's 'caption'), as clean str, or Skip."""
    raw = next((sample[e] for e in TEXT_EXTS if e in sample), None)
    if raw is None and "json" in sample:
        try:
            raw = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            raw = None
    if raw is None:
        raise Skip("missing_caption")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("bad_caption_encoding")
    text = " ".join(str(raw).split())
    if not text:
        raise Skip("empty_caption")
    return text


# ----------------------------------------------------------------------------- the held-out part

def is_heldout(key, fraction):
    """Is the sample with this key in the held-out part of a dataset without a validation split?
    A pure function of the key (a hash, not Python's salted hash()), so every run, rank, DataLoader
    worker and resume agrees, and a latent shard agrees with the images it was encoded from. The parts
    nest: what is held out at 1 % is also held out at 2 %."""
    h = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") < fraction * 2.0 ** 64


# ----------------------------------------------------------------------------- sources

def expand_braces(pattern):
    """'a{00000..00002}.tar' -> ['a00000.tar', 'a00001.tar', 'a00002.tar']; also '{a,b}'."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        parts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [p for part in parts for p in expand_braces(head + part + tail)]


def tar_shards(spec, split=None):
    """Tar files named by a directory, a glob, a brace pattern or one file. When the names carry a
    split (Hugging Face: cc3m-train-0000.tar, cc3m-validation-0000.tar), only `split`'s."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")) + glob.glob(os.path.join(spec, "*.tar.gz")))
    elif "{" in spec:
        paths = [p for p in expand_braces(spec) if os.path.exists(p)]
    elif any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec))
    else:
        paths = [spec] if os.path.isfile(spec) else []
    if not paths:
        raise FileNotFoundError(f"no .tar shards at {spec}; see {README} for the expected layout")
    if split is not None:
        names = [os.path.basename(p).lower() for p in paths]
        tags = ("train",) if split == "train" else ("valid", "val", "test")
        chosen = [p for p, n in zip(paths, names) if any(t in n for t in tags)]
        if has_split_names(paths):
            if not chosen:
                raise FileNotFoundError(f"no {split} shards among {len(paths)} at {spec}")
            paths = chosen
    return paths


def has_split_names(paths, tags=("train", "valid", "val", "test")):
    """Do the shard names carry a split (Hugging Face: cc3m-train-0000.tar, cc3m-validation-0000.tar)?"""
    return any(t in os.path.basename(p).lower() for p in paths for t in tags)


def _split_name(name):
    """WebDataset key / extension: 'dir/000123.jpg' -> ('dir/000123', 'jpg'); 'a.seg.png' -> ('a', 'seg.png')."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return os.path.join(d, stem), ext.lower()


def iter_tar(path, max_bytes):
    """Raw samples {'__key__', ext: bytes, ...} of one tar shard, streamed. A truncated or unreadable
    shard ends with {'__error__': 'truncated_shard'} after the samples read before the damage."""
    cur = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                if key is None:
                    continue
                if cur and key != cur["__key__"]:
                    yield cur
                    cur = {}
                cur["__key__"] = key
                if m.size > max_bytes:
                    cur["__error__"] = "oversized_member"  # not read: the stream skips its bytes
                    continue
                cur[ext] = tf.extractfile(m).read()
            # a whole tar ends with zero blocks; one cut at a member boundary just stops: not a clean end
            if tf.fileobj.comptype == "tar" and tf.offset + tarfile.BLOCKSIZE > os.fstat(f.fileno()).st_size:
                raise tarfile.ReadError("no end-of-archive block")
        if cur:
            yield cur
    except FileNotFoundError:  # deleted or unmounted since the shard list was made
        yield {"__key__": None, "__error__": "missing_shard"}
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        yield {"__key__": None, "__error__": "truncated_shard"}


def files_shards(root):
    """img2dataset files layout: the sub-directories of root holding images (or root itself)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a directory; see {README}")
    subdirs = sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    shards = [d for d in [root] + subdirs if _has_images(d)]
    if not shards:
        raise FileNotFoundError(f"no images (KEY.jpg + KEY.txt) in {root} or its sub-directories; see {README}")
    return shards


def _has_images(d):
    return any(n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for n in os.listdir(d))


def iter_dir(path, max_bytes):
    """Raw samples of one directory of KEY.jpg + KEY.txt (+ KEY.json) files."""
    groups = {}
    try:
        names = sorted(os.listdir(path))
    except OSError:  # deleted or unmounted since the shard list was made
        yield {"__key__": None, "__error__": "missing_shard"}
        return
    for name in names:
        full = os.path.join(path, name)
        key, ext = _split_name(name)
        if key is not None and os.path.isfile(full):
            groups.setdefault(key, {})[ext] = full
    for key, members in groups.items():
        sample = {"__key__": key}
        for ext, full in members.items():
            if ext not in IMAGE_EXTS + TEXT_EXTS + ("json",):
                continue
            try:
                if os.path.getsize(full) > max_bytes:
                    sample["__error__"] = "oversized_member"
                    continue
                with open(full, "rb") as f:
                    sample[ext] = f.read()
            except OSError:  # deleted since listed: the sample is skipped as incomplete
                sample["__error__"] = "missing_file"
        yield sample


def read_table(path):
    """[(image_path, caption, key)] of a TSV/CSV of local images, key = the path as the table writes it;
    URL-only lists raise ValueError."""
    delim = "," if path.lower().endswith(".csv") else "\t"
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        rows = [r for r in csv.reader(f, delimiter=delim) if r]
    if not rows:
        raise ValueError(f"{path} is empty")
    base = os.path.dirname(os.path.abspath(path))
    header = [c.strip().lower() for c in rows[0]]
    pcol = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    ccol = next((header.index(c) for c in CAPTION_COLUMNS if c in header), None)
    if pcol is not None and ccol is not None:
        rows = rows[1:]
    elif "url" in header or any(URL_RE.match(c) for c in rows[0]):
        raise _no_images(path)
    else:  # no header: the column whose values are files on disk holds the paths
        first = rows[0]
        exists = [i for i, c in enumerate(first) if os.path.isfile(os.path.join(base, c.strip()))]
        if not exists:
            if any(URL_RE.match(c) for r in rows[:10] for c in r):
                raise _no_images(path)
            raise ValueError(f"{path}: no column holds the path of an existing image (first row {first}); "
                             f"expected columns like filepath<TAB>caption, see {README}")
        pcol = exists[0]
        ccol = next(i for i in range(len(first)) if i != pcol)
    if all(URL_RE.match(r[pcol]) for r in rows[:10] if len(r) > pcol):
        raise _no_images(path)
    return [(os.path.join(base, r[pcol].strip()), r[ccol] if len(r) > ccol else "", r[pcol].strip())
            for r in rows if len(r) > pcol]


def read_coco(root, split):
    """[(image_path, [captions], file_name)] from COCO's captions JSON."""
    year_split = "train2017" if split == "train" else "val2017"
    ann = os.path.join(root, "annotations", f"captions_{year_split}.json")
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"{ann} not found: --dataset coco expects DIR/annotations/captions_{year_split}.json "
                                f"and DIR/{year_split}/ (see {README})")
    with open(ann, encoding="utf-8") as f:
        coco = json.load(f)
    caps = {}
    for a in coco["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    return [(os.path.join(root, year_split, im["file_name"]), caps.get(im["id"], []), im["file_name"])
            for im in sorted(coco["images"], key=lambda im: im["id"])]


# ----------------------------------------------------------------------------- the dataset

def _shuffled(items, size, rng):
    """Reservoir-style shuffle buffer over a stream."""
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = x
    for j in rng.permutation(len(buf)):
        yield buf[j]


class ImageTextDataset(IterableDataset):
    """Streams examples (see data/__init__.py) from `items`: shards read by `read(item)` into raw samples.

    items: list of work items (shard paths, or records for list sources); name(k): item k's display
    name in warnings.
    epochs: None = forever (train default), else that many passes (eval default 1).
    holdout: the share of samples held out by key (is_heldout) when the data has no validation split of
    its own, else 0; heldout: this stream reads that held-out part (validation) instead of the rest.
    """

    max_warnings = 20  # then skips are only counted

    def __init__(self, items, read, name, resolution=256, seed=0, shares=None, rank=0, world_size=1,
                 shuffle=True, shuffle_buffer=1000, epochs=None, max_pixels=50_000_000, max_bytes=32 << 20,
                 holdout=0.0, heldout=False):
        self.items, self.read, self.name = items, read, name
        self.holdout, self.heldout = holdout, heldout
        self.other_part = 0  # samples passed over because they belong to the other side of the holdout
        self.warned = 0
        self.resolution, self.seed = resolution, seed
        self.shares = shares or {"t2i": 0.8, "caption": 0.2}
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.epochs = shuffle, shuffle_buffer, epochs
        self.max_pixels, self.max_bytes = max_pixels, max_bytes
        self.stats = Counter()  # 'samples' read, plus one count per skip reason

    def my_items(self, epoch, unit, units):
        """This unit's item indices in this epoch: a seeded shuffle, then every units-th."""
        order = np.arange(len(self.items))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return [int(k) for k in order[unit::units]]

    def raw_samples(self, epoch, unit, units):
        """Raw samples of this unit's items, bad ones counted and warned about per item."""
        for k in self.my_items(epoch, unit, units):
            skipped = Counter()
            for sample in self.read(self.items[k], self.max_bytes):
                if "__error__" in sample:
                    skipped[sample["__error__"]] += 1
                elif self.holdout and is_heldout(sample["__key__"], self.holdout) != self.heldout:
                    self.other_part += 1     # not counted as skipped: it is the other split's sample
                else:
                    sample["__item__"] = k
                    yield sample
            self._count(k, skipped)

    def _count(self, k, skipped):
        if not skipped:
            return
        self.stats.update(skipped)
        self.warned += 1
        if self.warned <= self.max_warnings:
            more = "; further skips are only counted in dataset.stats" if self.warned == self.max_warnings else ""
            warnings.warn(f"{self.name(k)}: skipped {sum(skipped.values())} sample(s) "
                          f'({", ".join(f"{r} {n}" for r, n in sorted(skipped.items()))}){more}', DataWarning, stacklevel=3)

    def example(self, sample, rng):
        """Raw sample -> example dict, or Skip."""
        if "captions" in sample:
            caps = sample.pop("captions")
            sample["txt"] = caps[int(rng.integers(len(caps)))] if caps else ""
        text = decode_caption(sample)
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if data is None:
            raise Skip("missing_image")
        img = decode_image(data, self.resolution, self.max_pixels)
        if pick_task(self.shares, rng) == "t2i":
            return make_example("t2i", self.resolution, output_image=img, prompt=text)
        return make_example("caption", self.resolution, input_image=img, answer=text)

    def __iter__(self):
        unit, units = worker_unit(self.rank, self.world_size)
        if unit >= len(self.items):
            warnings.warn(f"{len(self.items)} shard(s) for {units} ranks x workers: unit {unit} has no data; "
                          f"use fewer DataLoader workers or more shards", DataWarning)
            return
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            rng = np.random.default_rng([self.seed, epoch, unit, 1])
            samples = self.raw_samples(epoch, unit, units)
            if self.shuffle and self.shuffle_buffer > 1:
                samples = _shuffled(samples, self.shuffle_buffer, rng)
            n = 0
            for sample in samples:
                try:
                    ex = self.example(sample, rng)
                except Skip as e:
                    self._count(sample["__item__"], Counter([e.args[0]]))
                    continue
                self.stats["samples"] += 1
                n += 1
                yield ex
            if n == 0:  # every sample bad: stop with one sentence rather than spin over the data forever
                mine = self.my_items(epoch, unit, units)
                if self.other_part:
                    part = "held-out" if self.heldout else "training"
                    raise EmptySplit(f"no readable sample of {len(mine)} item(s) starting with {self.name(mine[0])} "
                                     f"falls in the {part} part (--holdout {self.holdout:g}; {self.other_part} in the "
                                     f"other part): use more data or another --holdout")
                raise ValueError(f"no readable sample in {len(mine)} item(s) starting with {self.name(mine[0])}: "
                                 f'all were skipped ({", ".join(f"{r} {c}" for r, c in sorted(self.stats.items()))}); '
                                 f"check the data (see {README})")
            epoch += 1

    def pairs(self):
        """(key, caption or [captions], uint8 (3, R, R) image) of every readable sample of this split, in
        item order, one pass, no task draw: what evaluation compares against (all of COCO's captions of
        an image), and what the latent encoder stores. Bad samples are counted in self.stats."""
        for sample in self.raw_samples(0, 0, 1):
            try:
                if "captions" in sample:
                    caps = [decode_caption(dict(sample, txt=c)) for c in sample["captions"]]
                    if not caps:
                        raise Skip("missing_caption")
                else:
                    caps = decode_caption(sample)
                data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                if data is None:
                    raise Skip("missing_image")
                img = decode_image(data, self.resolution, self.max_pixels)
            except Skip as e:
                self.stats[e.args[0]] += 1
                continue
            yield sample["__key__"], caps, torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def captions(self, n):
        """Up to n captions in item order, without decoding images (for the word vocabulary)."""
        out = []
        for k in range(len(self.items)):
            for sample in self.read(self.items[k], self.max_bytes):
                if self.holdout and is_heldout(sample["__key__"], self.holdout) != self.heldout:
                    continue                 # the vocabulary is built from the training part only
                for caps in sample.pop("captions", None) or [None]:
                    try:
                        out.append(decode_caption(dict(sample, txt=caps) if caps else sample))
                    except Skip:
                        continue
                if len(out) >= n:
                    return out[:n]
        return out


def _read_record(record, max_bytes):
    """A list source's item: (image_path, caption or [captions], key) -> one raw sample. The key is the
    path as the list writes it, so the held-out part does not change when the dataset folder moves."""
    path, caption, key = record
    # COCO lists all of an image's captions: example() draws one with the stream's rng
    sample = {"__key__": key, "captions" if isinstance(caption, list) else "txt": caption}
    try:
        if os.path.getsize(path) > max_bytes:
            return [{"__key__": key, "__error__": "oversized_member"}]
        with open(path, "rb") as f:
            sample["jpg"] = f.read()
    except OSError:  # missing, or deleted since the list was read
        return [{"__key__": key, "__error__": "missing_image"}]
    return [sample]


def _record_label(source, items, k):
    return f"{source} record {k + 1} ({items[k][0]})"


def detect_layout(path):
    """'wds', 'files' or 'tsv' for what a cc3m / cc12m data_dir holds."""
    if os.path.isfile(path):
        return "wds" if path.endswith((".tar", ".tar.gz")) else "tsv"
    if not os.path.isdir(path):
        return "wds"  # a glob or brace pattern
    names = os.listdir(path)
    if any(n.endswith((".tar", ".tar.gz")) for n in names):
        return "wds"
    if any(os.path.isdir(os.path.join(path, n)) and _has_images(os.path.join(path, n)) for n in names) \
            or _has_images(path):
        return "files"
    if any(n.lower().endswith((".tsv", ".csv")) for n in names):
        return "tsv"
    raise FileNotFoundError(f"{path} holds no .tar shards, image folders or TSV of image paths; see {README}")


def _table_file(path):
    if os.path.isfile(path):
        return path
    tables = sorted(n for n in os.listdir(path) if n.lower().endswith((".tsv", ".csv")))
    if not tables:
        raise FileNotFoundError(f"no .tsv or .csv file in {path}; see {README}")
    return os.path.join(path, tables[0])


def build_imagetext(name, data_dir, split="train", resolution=256, seed=0, shares=None, rank=0, world_size=1,
                    holdout=HOLDOUT, **kwargs):
    """The dataset for --dataset NAME --data_dir DIR. kwargs: shuffle, shuffle_buffer, epochs,
    max_pixels, max_bytes (see ImageTextDataset).

    Data with a validation split of its own (COCO val2017, Hugging Face *-validation-* shards) is read
    by split. Other data (one folder, one TSV, img2dataset shards) has none: `holdout` of it, chosen by
    a hash of each sample's key, is the validation split and is never in the training split. With
    holdout=0, asking for a validation split raises FileNotFoundError (the caller decides what to do)."""
    if not data_dir:
        raise ValueError(f"--dataset {name} needs --data_dir: the folder of downloaded images and captions "
                         f"(CC3M/CC12M/COCO are not bundled; {README} says how to download them)")
    is_pattern = any(c in data_dir for c in "*?[{")
    if not is_pattern and not os.path.exists(data_dir):
        raise FileNotFoundError(f"--data_dir {data_dir} does not exist; {README} says how to download {name}")
    layout = name
    if name in ("cc3m", "cc12m"):
        layout = "wds" if is_pattern else detect_layout(data_dir)
    train = split == "train"
    kwargs.setdefault("shuffle", train)
    kwargs.setdefault("epochs", None if train else 1)
    own_split = layout == "coco"
    if layout == "wds":
        items = tar_shards(data_dir)
        if name in ("cc3m", "cc12m") and has_split_names(items):   # Hugging Face names: train / validation
            own_split = has_split_names(items, ("valid", "val", "test"))
            items = tar_shards(data_dir, split if own_split else "train")
        read, label = iter_tar, items.__getitem__
    elif layout == "files":
        items = files_shards(data_dir)
        read, label = iter_dir, items.__getitem__
    elif layout == "tsv":
        table = _table_file(data_dir)
        items, read = read_table(table), _read_record
        label = functools.partial(_record_label, table, items)
    elif layout == "coco":
        items, read = read_coco(data_dir, split), _read_record
        label = functools.partial(_record_label, os.path.join(data_dir, "annotations"), items)
    else:
        raise ValueError(f"unknown image-text dataset {name!r}")
    if own_split:
        holdout = 0.0
    elif not train and not holdout:
        raise FileNotFoundError(f"{data_dir} has no validation split and --holdout is 0, so nothing is held out")
    elif layout == "tsv":   # drop the other part's records up front: their images are never opened
        kept = [r for r in items if is_heldout(r[2], holdout) != train]
        if not kept:
            raise EmptySplit(f"none of the {len(items)} records of {data_dir} falls in the "
                             f"{'training' if train else 'held-out'} part (--holdout {holdout:g}): use more data "
                             f"or another --holdout")
        items = kept
    ds = ImageTextDataset(items, read, label, resolution, seed, shares, rank, world_size, holdout=holdout,
                          heldout=not train, **kwargs)
    ds.own_split = own_split
    return ds


def caption_corpus(name, data_dir, n=2000, seed=0, holdout=HOLDOUT):
    """The first n captions of a real dataset's training part (for the word vocabulary)."""
    return build_imagetext(name, data_dir, "train", seed=seed, shuffle=False, holdout=holdout).captions(n)
