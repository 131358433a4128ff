"""The held-out split of real data without a validation split of its own: which samples it holds depends
on their keys alone, and no reader ever trains on them (not through ranks, DataLoader workers, resumes,
the vocabulary or pre-encoded latents)."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import train
from data import build_dataset, text_corpus
from data.imagetext import is_heldout
from data.streams import ShardStream, TaskStreams

N, HOLDOUT = 30, 0.3


def _jpeg(i):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (8 * i, 255 - 8 * i, 100)).save(buf, "JPEG")
    return buf.getvalue()


def _write(tmp_path, layout):
    """N samples 'caption number i' in one layout; -> (dataset name, data_dir, {caption: key})."""
    keys = {f"caption number {i}": f"{i:09d}" for i in range(N)}
    if layout in ("wds", "cc3m_train_shards_only"):
        names = ["00000.tar", "00001.tar"] if layout == "wds" else ["cc3m-train-0000.tar", "cc3m-train-0001.tar"]
        for s, name in enumerate(names):
            with tarfile.open(tmp_path / name, "w") as tf:
                for i in range(s * N // 2, (s + 1) * N // 2):
                    for ext, data in (("jpg", _jpeg(i)), ("txt", f"caption number {i}".encode())):
                        info = tarfile.TarInfo(f"{i:09d}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
        return ("wds" if layout == "wds" else "cc3m"), str(tmp_path), keys
    if layout == "files":
        for i in range(N):
            d = tmp_path / f"{i // 10:05d}"
            d.mkdir(exist_ok=True)
            (d / f"{i:09d}.jpg").write_bytes(_jpeg(i))
            (d / f"{i:09d}.txt").write_text(f"caption number {i}")
        return "files", str(tmp_path), keys
    (tmp_path / "images").mkdir()                              # tsv: the key is the path the table writes
    for i in range(N):
        (tmp_path / "images" / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp_path / "list.tsv").write_text("".join(f"images/{i}.jpg\tcaption number {i}\n" for i in range(N)))
    return "tsv", str(tmp_path / "list.tsv"), {f"caption number {i}": f"images/{i}.jpg" for i in range(N)}


def _texts(ds):
    return [ex["prompt"] or ex["answer"] for ex in ds]


@pytest.mark.parametrize("layout", ["wds", "files", "tsv", "cc3m_train_shards_only"])
def test_every_reader_holds_out_the_same_part_and_never_trains_on_it(tmp_path, layout):
    name, data_dir, keys = _write(tmp_path, layout)
    held = {c for c, k in keys.items() if is_heldout(k, HOLDOUT)}
    assert 0 < len(held) < N                                   # both parts hold something at this size
    kw = dict(resolution=16, holdout=HOLDOUT)
    val = _texts(build_dataset(name, data_dir, split="val", **kw))
    assert sorted(val) == sorted(held)                         # one pass over exactly the held-out part
    # training, split over 2 ranks x 2 DataLoader workers, several epochs: every other sample, never a held-out one
    seen = []
    for rank in range(2):
        ds = build_dataset(name, data_dir, split="train", rank=rank, world_size=2, epochs=3, **kw)
        for batch in DataLoader(ds, batch_size=4, num_workers=2):
            seen += [p or a for p, a in zip(batch["prompt"], batch["answer"])]
    assert set(seen) == set(keys) - held and len(seen) == 3 * (N - len(held))
    assert not held & set(text_corpus(name, data_dir, n=1000, holdout=HOLDOUT))   # nor the word vocabulary
    # the same part whatever the seed (another run) and at a larger holdout it only grows (nested)
    assert sorted(_texts(build_dataset(name, data_dir, split="val", seed=7, **kw))) == sorted(held)
    assert held <= set(_texts(build_dataset(name, data_dir, split="val", resolution=16, holdout=0.6)))


def test_the_split_is_a_fixed_function_of_the_key():
    """Not Python's hash() (salted per process): another process, rank or machine must agree."""
    assert [i for i in range(40) if is_heldout(f"{i:09d}", HOLDOUT)] == \
        [0, 2, 4, 9, 10, 15, 19, 22, 24, 25, 27, 29, 36, 38]
    assert not any(is_heldout(f"{i:09d}", 0.0) for i in range(40)) and all(is_heldout(f"{i}", 1.0) for i in range(40))


def test_data_with_its_own_validation_split_keeps_it(tmp_path):
    """Hugging Face shards named by split: validation reads the validation shards and training all its own."""
    name, data_dir, keys = _write(tmp_path, "cc3m_train_shards_only")
    with tarfile.open(tmp_path / "cc3m-validation-0000.tar", "w") as tf:
        for ext, data in (("jpg", _jpeg(0)), ("txt", b"a validation caption")):
            info = tarfile.TarInfo(f"val0.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert _texts(build_dataset("cc3m", data_dir, split="val", resolution=16)) == ["a validation caption"]
    train_texts = _texts(build_dataset("cc3m", data_dir, split="train", resolution=16, epochs=1, holdout=HOLDOUT))
    assert sorted(train_texts) == sorted(keys)


def test_pre_encoded_latents_hold_out_the_same_samples(tmp_path, vae_path):
    """vae.py --encode stores every sample; the latent reader holds out the same keys as the image reader."""
    import vae as vae_lib
    from data.latents import LatentDataset
    (tmp_path / "wds").mkdir()
    name, data_dir, keys = _write(tmp_path / "wds", "wds")
    held = {c for c, k in keys.items() if is_heldout(k, HOLDOUT)}
    lat = str(tmp_path / "lat")
    assert vae_lib.main(["--encode", "--vae", vae_path, "--dataset", name, "--data_dir", data_dir,
                         "--resolution", "32", "--out_dir", lat]) == N
    assert json.load(open(tmp_path / "lat" / "meta.json"))["own_val_split"] is False
    assert sorted(_texts(LatentDataset(lat, split="val", holdout=HOLDOUT))) == sorted(held)
    assert set(_texts(LatentDataset(lat, split="train", holdout=HOLDOUT, epochs=2))) == set(keys) - held
    assert not held & set(text_corpus("latents", lat, n=1000, holdout=HOLDOUT))
    with pytest.raises(SystemExit, match="no validation split of its own"):
        vae_lib.main(["--encode", "--vae", vae_path, "--dataset", name, "--data_dir", data_dir, "--split", "val",
                      "--resolution", "32", "--out_dir", lat])


def test_train_streams_and_validation_follow_the_holdout_flag(tmp_path, monkeypatch):
    """train.py's per-task streams (with a resume offset) and its word vocabulary read the training part
    of --holdout, its validation stream the held-out part, and the stream says where validation comes from."""
    name, data_dir, keys = _write(tmp_path, "wds")
    held = {c for c, k in keys.items() if is_heldout(k, HOLDOUT)}
    args = train.get_args(["--dataset", name, "--data_dir", data_dir, "--resolution", "16", "--holdout", str(HOLDOUT)])
    texts = []
    monkeypatch.setattr(train.WordTokenizer, "build", classmethod(lambda cls, t: texts.extend(t) or cls([])))
    train.build_tokenizer(args, None)
    assert set(texts) == set(keys) - held
    streams = TaskStreams(args, 0, 1, start_step=3, rows={"t2i": 3, "caption": 1})
    seen = {e["prompt"] or e["answer"] for _ in range(20) for e in streams.take(4)}
    assert seen == set(keys) - held
    val = ShardStream(args, "val", 0, 1, tasks={"t2i": 1.0})
    assert {e["prompt"] for e in val.take(2 * N)} == held and "held out of training" in val.note
    args.holdout = 0       # nothing held out: validation reads the training data, and says so
    assert "cannot show overfitting" in ShardStream(args, "val", 0, 1).note


def test_the_vae_trained_first_never_sees_held_out_images(tmp_path, monkeypatch):
    """train.py without --vae trains a VAE on the dataset first: on the training part of --holdout only."""
    import itertools
    import vae
    (tmp_path / "d").mkdir()
    name, data_dir, keys = _write(tmp_path / "d", "wds")
    held = {c for c, k in keys.items() if is_heldout(k, HOLDOUT)}
    args = train.get_args(["--dataset", name, "--data_dir", data_dir, "--resolution", "16", "--holdout", str(HOLDOUT),
                           "--out_dir", str(tmp_path / "out" / "run")])
    seen = set()

    class Stop(Exception):
        pass

    def record(ds, out_dir, **kw):
        seen.update(ex["prompt"] for ex in itertools.islice(ds, 3 * N))
        raise Stop
    monkeypatch.setattr(vae, "train_vae", record)
    with pytest.raises(Stop):
        train.setup_vae(args, torch.device("cpu"), True, print)
    assert seen == set(keys) - held


@pytest.mark.parametrize("layout", ["wds", "tsv"])
def test_a_dataset_too_small_to_hold_anything_out_validates_on_training_data_and_says_so(tmp_path, layout):
    name, data_dir, keys = _write(tmp_path, layout)
    assert not any(is_heldout(k, 0.001) for k in keys.values())
    args = train.get_args(["--dataset", name, "--data_dir", data_dir, "--resolution", "16", "--holdout", "0.001"])
    val = ShardStream(args, "val", 0, 1, tasks={"t2i": 1.0})
    assert "held-out part of this small dataset is empty" in val.note
    assert {e["prompt"] for e in val.take(N)} == set(keys)
