"""data/: the shapes dataset and its oracle, and the real image-text readers."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader

from data import build_dataset, task_shares, text_corpus
from data import shapes as S
from data.imagetext import DataWarning

ALL_TASKS = {"t2i": 1, "caption": 1, "vqa": 1, "edit": 1}


def held_out_scenes(n, resolution=32, seed=1):
    return [S.random_scene(S.rng_for(seed, "test", i), "test", resolution) for i in range(n)]


# ----------------------------------------------------------------------------- shapes: the oracle

@pytest.mark.parametrize("resolution,n", [(32, 300), (64, 100)])
def test_oracle_reads_back_rendered_scenes(resolution, n):
    scenes = held_out_scenes(n, resolution)
    agree = np.mean([S.objects_agree(S.read_objects(S.render(sc, resolution)), sc.objects) for sc in scenes])
    assert agree >= 0.98, agree


@pytest.mark.parametrize("degrade", [
    lambda im: im.filter(ImageFilter.GaussianBlur(0.8)),
    lambda im: im.resize((16, 16), Image.BILINEAR).resize((32, 32), Image.BILINEAR),  # a 2x-lossy VAE
])
def test_oracle_survives_vae_like_blur(degrade):
    scenes = held_out_scenes(200)
    agree = np.mean([S.objects_agree(S.read_objects(degrade(S.render(sc))), sc.objects) for sc in scenes])
    assert agree >= 0.95, agree


def test_score_image_accepts_matching_and_rejects_mismatched_prompts():
    scenes = held_out_scenes(300, seed=2)
    prompts = [S.t2i_prompt(sc, np.random.default_rng(i), 0.3) for i, sc in enumerate(scenes)]
    images = [S.render(sc) for sc in scenes]
    match = np.mean([S.score_image(im, spec) for im, (_, spec) in zip(images, prompts)])
    assert match >= 0.98, match
    # pair each prompt with the next scene's image; keep pairs the ground truth says do not fit
    wrong = [(images[(i + 1) % len(scenes)], spec) for i, (_, spec) in enumerate(prompts)
             if not S.satisfies(scenes[(i + 1) % len(scenes)].objects, spec)]
    assert len(wrong) > 200
    rejected = np.mean([not S.score_image(im, spec) for im, spec in wrong])
    assert rejected >= 0.95, rejected


def test_eval_prompts_cover_geneval_tasks_and_heldout_pairs():
    prompts = S.eval_prompts(n_per_task=12, seed=0)
    assert [p["task"] for p in prompts] == [t for t in S.TASKS for _ in range(12)]
    assert prompts == S.eval_prompts(n_per_task=12, seed=0)  # deterministic
    for p in prompts:  # each prompt is drawable, and its reference scene satisfies it
        assert S.score_image(S.render(p["scene"]), p["spec"]), p["prompt"]
    held = [p for p in prompts if p["heldout"]]
    assert held and {p["task"] for p in held} <= {"colors", "color_attr"}
    assert S.score_image(S.render(S.Scene((S.Obj("circle", "red", "large", 0.5, 0.5),))), {
        "objects": [{"shape": "circle", "color": "red", "size": None}], "count": None, "relation": None})


def test_caption_vqa_and_edit_scores():
    items = S.eval_scenes(60, seed=0)
    assert all(S.score_caption(it["caption"], it["scene"]) == 1.0 for it in items)
    others = [S.score_caption(items[(i + 1) % 60]["caption"], it["scene"]) for i, it in enumerate(items)]
    assert np.mean(others) < 0.6
    two = S.Scene((S.Obj("circle", "red", "small", 0.5, 0.2), S.Obj("square", "blue", "large", 0.5, 0.7)))
    assert S.caption(two) == "a small red circle above a large blue square"
    assert S.score_caption("a large blue square below a small red circle", two) == 1.0  # any order
    assert S.score_caption("a small red circle below a large blue square", two) == 6 / 7  # wrong relation
    assert S.score_vqa("Two", "two") and S.score_vqa("2", "two") and not S.score_vqa("three", "two")
    for it in items:  # the edited image scores, the unedited one does not; answers are one word
        assert S.score_edit(it["target_image"], it["target"]), it["instruction"]
        assert not S.score_edit(it["image"], it["target"]), it["instruction"]
        assert S.score_edit(it["target_image"].filter(ImageFilter.GaussianBlur(0.8)), it["target"])
        assert len(it["answer"].split()) == 1
    rng = np.random.default_rng(0)          # every question has its kind, and every kind is asked
    kinds = [S.vqa_kind(S.vqa(S.random_scene(rng), rng)[0]) for _ in range(300)]
    assert set(kinds) == set(S.VQA_KINDS)
    with pytest.raises(ValueError, match="not a shapes VQA question"):
        S.vqa_kind("why is the sky blue")


def test_training_split_never_shows_heldout_pairs():
    ds = build_dataset("shapes", tasks=ALL_TASKS, num_samples=600)
    for ex in ds:
        text = f"{ex['prompt']} {ex['answer']}"
        assert not any(f"{c} {s}" in text for c, s in S.HELDOUT_PAIRS), text
        for key in ("input_image", "output_image"):
            if ex[key].abs().sum() > 0:
                assert not any((o.color, o.shape) in S.HELDOUT_PAIRS for o in S.read_objects(ex[key]))
    test_scenes = held_out_scenes(300)
    assert any((o.color, o.shape) in S.HELDOUT_PAIRS for sc in test_scenes for o in sc.objects)


# ----------------------------------------------------------------------------- shapes: the dataset

def test_examples_collate_with_fixed_keys_and_ranges():
    batch = next(iter(DataLoader(build_dataset("shapes", tasks=ALL_TASKS), batch_size=64)))
    assert set(batch) == {"task", "input_image", "output_image", "prompt", "answer"}
    assert batch["input_image"].shape == batch["output_image"].shape == (64, 3, 32, 32)
    assert batch["input_image"].min() >= -1 and batch["input_image"].max() <= 1
    for i, task in enumerate(batch["task"]):
        has_in, has_out = batch["input_image"][i].abs().sum() > 0, batch["output_image"][i].abs().sum() > 0
        assert (has_in, has_out) == {"t2i": (False, True), "caption": (True, False),
                                     "vqa": (True, False), "edit": (True, True)}[task]
        assert bool(batch["prompt"][i]) == (task != "caption")
        assert bool(batch["answer"][i]) == (task in ("caption", "vqa"))
    assert set(batch["task"]) == {"t2i", "caption", "vqa", "edit"}
    # a t2i example's image satisfies its prompt
    i = batch["task"].index("t2i")
    assert S.score_image(batch["output_image"][i], S.parse_prompt(batch["prompt"][i]))


def _fingerprints(loader):
    out = []
    for b in loader:
        for i in range(len(b["task"])):
            out.append((b["task"][i], b["prompt"][i], b["answer"][i],
                        round(float(b["input_image"][i].sum()), 3), round(float(b["output_image"][i].sum()), 3)))
    return out


def test_same_seed_same_samples_for_any_workers_and_ranks():
    make = lambda **kw: build_dataset("shapes", tasks=ALL_TASKS, num_samples=40, **kw)
    one = _fingerprints(DataLoader(make(), batch_size=8))
    assert one == _fingerprints(DataLoader(make(), batch_size=8))  # repeatable
    two_workers = _fingerprints(DataLoader(make(), batch_size=8, num_workers=2))
    ranks = [_fingerprints(DataLoader(make(rank=r, world_size=2), batch_size=8)) for r in range(2)]
    assert len(set(one)) == 40
    assert sorted(two_workers) == sorted(one)
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(one)
    assert _fingerprints(DataLoader(build_dataset("shapes", seed=1, num_samples=40), batch_size=8)) != one


def test_text_corpus_covers_every_word_the_data_emits():
    vocab = {w for t in text_corpus("shapes") for w in t.split()}
    emitted = set()
    for ex in build_dataset("shapes", tasks=ALL_TASKS, num_samples=400):
        emitted |= set(ex["prompt"].split()) | set(ex["answer"].split())
    for p in S.eval_prompts(10):
        emitted |= set(p["prompt"].split())
    assert emitted <= vocab and vocab == set(S.WORDS)


def test_task_shares_drop_unsupported_tasks():
    assert task_shares({"t2i": 0.5, "caption": 0.25, "vqa": 0.25}, {}, ("t2i", "caption")) == \
        {"t2i": 2 / 3, "caption": 1 / 3}
    with pytest.raises(ValueError):
        task_shares({"vqa": 1.0}, {}, ("t2i", "caption"))


# ----------------------------------------------------------------------------- real data

def _encode(color, size=(48, 40), mode="RGB", fmt="JPEG", **save):
    """Bytes of a flat image (48 x 40: not square, so the centre crop runs too)."""
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


# images in every mode the readers must convert, and the RGB they should come out as (about)
MODES = [
    (lambda: _encode((255, 0, 0)), (255, 0, 0)),
    (lambda: _encode(128, mode="L"), (128, 128, 128)),
    (lambda: _encode((0, 255, 255, 0), mode="CMYK"), (255, 0, 0)),
    (lambda: _encode((0, 0, 255, 0), mode="RGBA", fmt="PNG"), (255, 255, 255)),  # transparent -> white
    (lambda: _encode(3, mode="P", fmt="PNG"), None),
    (lambda: _encode(0, mode="P", fmt="PNG", transparency=0), (255, 255, 255)),  # transparent palette entry
    (lambda: _encode(32768, mode="I;16", fmt="PNG"), (128, 128, 128)),  # 16-bit grey
]


# every sample once, in order (nothing held out): what the reader tests below compare with what they wrote
EVERY_SAMPLE = dict(split="train", holdout=0, epochs=1, shuffle=False)


def _samples(n, start=0):
    """(key, image bytes, caption, expected rgb) for n samples cycling through the image modes."""
    return [(f"{start + i:09d}", MODES[i % len(MODES)][0](), f"caption number {start + i}", MODES[i % len(MODES)][1])
            for i in range(n)]


def _write_tar(path, samples, extra=()):
    with tarfile.open(path, "w") as tf:
        for key, img, cap, _ in samples:
            members = [(f"{key}.jpg", img), (f"{key}.txt", cap.encode()), (f"{key}.json", json.dumps({"caption": cap}).encode())]
            for name, data in members + [m for m in extra if m[0].startswith(key)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _read_all(ds):
    out = {}
    for ex in ds:
        text = ex["prompt"] or ex["answer"]
        img = ex["output_image"] if ex["task"] == "t2i" else ex["input_image"]
        assert ex["task"] in ("t2i", "caption") and img.shape == (3, 16, 16)
        assert text not in out
        out[text] = ((img + 1) * 127.5).mean((1, 2))
    return out


def _check(out, samples):
    assert set(out) == {cap for _, _, cap, _ in samples}
    for _, _, cap, rgb in samples:
        if rgb is not None:
            assert torch.allclose(out[cap], torch.tensor(rgb, dtype=torch.float32), atol=12), (cap, out[cap], rgb)


def test_webdataset_shards_by_dir_glob_and_brace_pattern(tmp_path):
    samples = _samples(12)
    for s in range(3):
        _write_tar(tmp_path / f"{s:05d}.tar", samples[4 * s:4 * s + 4])
    for spec in (str(tmp_path), str(tmp_path / "*.tar"), str(tmp_path / "{00000..00002}.tar")):
        _check(_read_all(build_dataset("wds", spec, **EVERY_SAMPLE, resolution=16)), samples)
    _check(_read_all(build_dataset("cc3m", str(tmp_path), **EVERY_SAMPLE, resolution=16)), samples)
    brace = build_dataset("wds", str(tmp_path / "{00000..00001}.tar"), **EVERY_SAMPLE, resolution=16)
    assert len(_read_all(brace)) == 8


def test_huggingface_cc3m_shards_pick_the_split(tmp_path):
    train, val = _samples(4), _samples(3, start=100)
    _write_tar(tmp_path / "cc3m-train-0000.tar", train)
    _write_tar(tmp_path / "cc3m-validation-0000.tar", val)
    _check(_read_all(build_dataset("cc3m", str(tmp_path), split="train", resolution=16, epochs=1)), train)
    _check(_read_all(build_dataset("cc3m", str(tmp_path), split="val", resolution=16)), val)


def test_img2dataset_files_layout(tmp_path):
    samples = _samples(7)
    for i, (key, img, cap, _) in enumerate(samples):
        d = tmp_path / f"{i // 4:05d}"
        d.mkdir(exist_ok=True)
        (d / f"{key}.jpg").write_bytes(img)
        (d / f"{key}.txt").write_text(cap)
    (tmp_path / "00000_stats.json").write_text("{}")
    _check(_read_all(build_dataset("files", str(tmp_path), **EVERY_SAMPLE, resolution=16)), samples)
    _check(_read_all(build_dataset("cc12m", str(tmp_path), **EVERY_SAMPLE, resolution=16)), samples)


@pytest.mark.parametrize("header", [True, False])
def test_tsv_of_local_paths(tmp_path, header):
    samples = _samples(5)
    (tmp_path / "images").mkdir()
    rows = ["filepath\tcaption"] if header else []
    for key, img, cap, _ in samples:
        (tmp_path / "images" / f"{key}.jpg").write_bytes(img)
        rows.append(f"images/{key}.jpg\t{cap}")
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n")
    _check(_read_all(build_dataset("tsv", str(tmp_path / "train.tsv"), **EVERY_SAMPLE, resolution=16)), samples)
    csv = tmp_path / "train.csv"
    csv.write_text("caption,image_path\n" + "".join(f'"{c}, ok",{tmp_path}/images/{k}.jpg\n' for k, _, c, _ in samples))
    assert len(_read_all(build_dataset("tsv", str(csv), **EVERY_SAMPLE, resolution=16))) == 5


def test_coco_captions_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        images, anns = [], []
        for i, (key, img, cap, _) in enumerate(_samples(4)):
            (tmp_path / split / f"{key}.jpg").write_bytes(img)
            images.append({"id": i, "file_name": f"{key}.jpg"})
            anns += [{"image_id": i, "id": 10 * i + j, "caption": f"{cap} {split} variant {j}"} for j in range(5)]
        (tmp_path / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    out = _read_all(build_dataset("coco", str(tmp_path), split="val", resolution=16))
    assert len(out) == 4 and all(" val2017 variant " in c for c in out)  # one of each image's captions
    assert text_corpus("coco", str(tmp_path), n=6) == [f"caption number {i} train2017 variant {j}"
                                                       for i in range(2) for j in range(5)][:6]


def test_url_only_lists_and_missing_data_dir_point_to_readme(tmp_path):
    cc3m = tmp_path / "Train_GCC-training.tsv"
    cc3m.write_text("a man rides a horse\thttp://example.com/1.jpg\nsunset\thttps://example.com/2.jpg\n")
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("https://example.com/1.jpg\ta dog\n")
    for name, path in (("cc3m", cc3m), ("cc12m", cc12m), ("tsv", cc3m), ("cc3m", tmp_path)):
        with pytest.raises(ValueError, match="holds no images.*data/README.md"):
            build_dataset(name, str(path))
    with pytest.raises(ValueError, match="needs --data_dir.*data/README.md"):
        build_dataset("cc3m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset("coco", str(tmp_path / "missing"))


def test_bad_samples_are_skipped_counted_and_warned(tmp_path):
    good = _samples(4)
    bad = [("000000100", b"not an image at all", "corrupt jpeg", None),
           ("000000101", _encode((1, 2, 3), size=(300, 300), fmt="PNG"), "a decompression bomb", None),
           ("000000102", _encode((1, 2, 3)), "   ", None)]
    _write_tar(tmp_path / "00000.tar", good[:2] + bad)
    with tarfile.open(tmp_path / "00001.tar", "w") as tf:  # no caption; a caption that is not UTF-8
        for name, data in (("000000200.jpg", _encode((9, 9, 9))), ("000000201.jpg", _encode((9, 9, 9))),
                           ("000000201.txt", "caf\xe9".encode("latin-1"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    _write_tar(tmp_path / "full.tar", good[2:] + _samples(6, start=300))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(data[:len(data) // 2])  # truncated mid-shard
    (tmp_path / "full.tar").unlink()
    ds = build_dataset("wds", str(tmp_path), **EVERY_SAMPLE, resolution=16, max_pixels=200 * 200)
    with pytest.warns(DataWarning) as record:
        out = _read_all(ds)
    assert {"caption number 0", "caption number 1", "caption number 2"} <= set(out)
    assert dict(ds.stats, samples=0) == {"samples": 0, "corrupt_image": 1, "oversized_image": 1, "empty_caption": 1,
                                         "missing_caption": 1, "bad_caption_encoding": 1, "truncated_shard": 1}
    assert ds.stats["samples"] == len(out)
    messages = " ".join(str(w.message) for w in record)
    assert "00000.tar" in messages and "00001.tar" in messages and "00002.tar" in messages


def test_shards_split_disjointly_over_ranks_and_workers(tmp_path):
    samples = _samples(15)
    for s in range(5):
        _write_tar(tmp_path / f"{s:05d}.tar", samples[3 * s:3 * s + 3])
    seen = []
    for rank in range(2):
        ds = build_dataset("wds", str(tmp_path), split="train", resolution=16, rank=rank, world_size=2, epochs=1, holdout=0)
        for b in DataLoader(ds, batch_size=4, num_workers=2):
            seen += [p or a for p, a in zip(b["prompt"], b["answer"])]
    assert sorted(seen) == sorted(cap for _, _, cap, _ in samples)  # each sample exactly once
    # an endless train stream goes on epoch after epoch, each a new order of every sample
    stream = iter(build_dataset("wds", str(tmp_path), resolution=16, shuffle_buffer=4, holdout=0))
    text = lambda ex: ex["prompt"] or ex["answer"]
    first, second = [[text(next(stream)) for _ in range(15)] for _ in range(2)]
    assert sorted(first) == sorted(second) == sorted(cap for _, _, cap, _ in samples) and first != second


def test_tsv_records_split_disjointly(tmp_path):
    samples = _samples(9)
    for key, img, _, _ in samples:
        (tmp_path / f"{key}.jpg").write_bytes(img)
    (tmp_path / "list.tsv").write_text("".join(f"{k}.jpg\t{c}\n" for k, _, c, _ in samples))
    parts = [list(_read_all(build_dataset("tsv", str(tmp_path / "list.tsv"), split="train", resolution=16,
                                          rank=r, world_size=3, epochs=1, holdout=0))) for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert sorted(sum(parts, [])) == sorted(c for _, _, c, _ in samples)


def test_score_image_rejects_noise_like_a_detector_would():
    """Random pixels contain blobs of every shape and colour; a detector sees no object there."""
    rng = np.random.default_rng(0)
    prompts = S.eval_prompts(10, seed=0)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in prompts]
    grey_noise = [np.clip(128 + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8) for _ in prompts]
    assert not any(S.score_image(im, p["spec"]) for im, p in zip(noise + grey_noise, prompts + prompts))
    assert S.read_objects(noise[0], strict=True) is None


def test_extra_objects_fail_every_prompt():
    """Every prompt names all of its scene's objects, so a canvas with more objects than named (the
    output of an untrained model is many coloured blobs) fails, even when it contains the named ones:
    each prompt's reference scene is rendered with one more object placed clear of the others."""
    crowded_scenes = 0
    for i, p in enumerate(S.eval_prompts(10, seed=1)):
        scene, rng = p["scene"], np.random.default_rng(i)
        assert S.score_image(S.render(scene), p["spec"])
        pos = S._place(rng, "small", list(scene.objects))
        if pos is None:                     # no room left on this canvas
            continue
        extra = S.Obj(S.SHAPES[i % 3], S.COLORS[i % 6], "small", *pos)
        image = S.render(S.Scene(scene.objects + (extra,)))
        assert S.objects_agree(S.read_objects(image), scene.objects + (extra,)), p["prompt"]
        assert not S.score_image(image, p["spec"]), p["prompt"]
        crowded_scenes += 1
    assert crowded_scenes >= 40
    assert not S.satisfies([S.Obj("circle", "red", "small", 0.2, 0.2), S.Obj("square", "blue", "small", 0.7, 0.7)],
                           S.parse_prompt("a circle"))
    assert not S.satisfies([S.Obj("circle", "red", "small", 0.2, 0.2)] * 2 + [S.Obj("square", "red", "small", 0.7, 0.7)],
                           S.parse_prompt("two circles"))


# ----------------------------------------------------------------------------- shapes: the oracle, attribute by attribute
# Each test renders a hand-built scene, checks the oracle accepts its true spec, and rejects a spec that
# differs in exactly one attribute: the one check in satisfies / _matches that catches it.

def _obj(shape, color, size, x, y):
    return S.Obj(shape, color, size, x, y)


def _accepts_true_rejects_wrong(objects, true_spec, wrong_spec, resolution=32):
    image = S.render(S.Scene(tuple(objects)), resolution)
    assert S.objects_agree(S.read_objects(image), objects)          # the oracle reads the scene right
    assert S.score_image(image, true_spec), true_spec
    assert not S.score_image(image, wrong_spec), wrong_spec


def test_oracle_rejects_a_wrong_colour():
    objs = [_obj("circle", "red", "large", 0.5, 0.5)]
    _accepts_true_rejects_wrong(objs, S.parse_prompt("a red circle"), S.parse_prompt("a blue circle"))
    two = [_obj("square", "green", "small", 0.25, 0.3), _obj("triangle", "yellow", "small", 0.7, 0.7)]
    _accepts_true_rejects_wrong(two, S.parse_prompt("a green square and a yellow triangle"),
                                S.parse_prompt("a green square and a purple triangle"))


def test_oracle_rejects_a_swapped_relation():
    pairs = [([_obj("circle", "red", "small", 0.5, 0.2), _obj("square", "blue", "small", 0.5, 0.75)], "above", "below"),
             ([_obj("triangle", "cyan", "small", 0.2, 0.5), _obj("circle", "purple", "large", 0.7, 0.45)],
              "left of", "right of")]
    for objs, true, swapped in pairs:
        a, b = objs
        for spec in (S.parse_prompt(f"a {a.shape} {true} a {b.shape}"), S.scene_spec(S.Scene(tuple(objs)))):
            wrong = {**spec, "relation": swapped}
            _accepts_true_rejects_wrong(objs, spec, wrong)


def test_oracle_rejects_a_wrong_size_under_a_full_caption_spec():
    objs = [_obj("circle", "red", "small", 0.3, 0.25), _obj("square", "blue", "large", 0.6, 0.7)]
    scene = S.Scene(tuple(objs))
    spec = S.parse_prompt(S.caption(scene))
    assert spec == {**S.scene_spec(scene), "objects": spec["objects"]} and all(o["size"] for o in spec["objects"])
    for i in range(2):                       # each object's size flipped in turn, all else true
        wrong = {**spec, "objects": [dict(o) for o in spec["objects"]]}
        wrong["objects"][i]["size"] = {"small": "large", "large": "small"}[wrong["objects"][i]["size"]]
        _accepts_true_rejects_wrong(objs, spec, wrong)


def test_oracle_rejects_a_count_off_by_one():
    """Three objects, two of them circles: 'three circles' has the right object count (so only the count
    of matching objects rejects it), 'two circles' the right circle count (so the exact check does)."""
    objs = [_obj("circle", "red", "small", 0.2, 0.2), _obj("circle", "blue", "small", 0.7, 0.2),
            _obj("square", "green", "small", 0.2, 0.72)]
    spec = {"objects": [{"shape": "circle", "color": None, "size": None}], "count": 2, "relation": None, "exact": False}
    _accepts_true_rejects_wrong(objs, spec, {**spec, "count": 3, "exact": True})
    _accepts_true_rejects_wrong(objs, spec, {**spec, "count": 1})
    _accepts_true_rejects_wrong(objs[:2], S.parse_prompt("two circles"), S.parse_prompt("three circles"))


# ----------------------------------------------------------------------------- the evaluation, end to end

class Oracle:
    """A stand-in model + VAE for evaluate_shapes: generation returns a stored image ("latents" that the
    identity VAE decodes, in [-1, 1]), text generation a stored string, both looked up by the prompt and
    the input image, so every accuracy says whether evaluate_shapes pairs, decodes and splits right.
    answer(kind, key, truth, other) picks what is returned: the truth, or another item's truth."""

    def __init__(self, n_per_task, answer, seed=0, res=32):
        from vae import from_pil
        self.cfg = type("Cfg", (), {"image_size": res, "max_text_len": 16})()
        self.llm = torch.nn.Module()
        self.llm.embed_tokens = torch.nn.Embedding(1, 1)
        key = lambda image: from_pil([image], res)[0].numpy().tobytes()
        prompts = S.eval_prompts(n_per_task, seed=seed, split="test", resolution=res)
        scenes = S.eval_scenes(2 * n_per_task, seed=seed, split="test", resolution=res)
        render = lambda scene: from_pil([S.render(scene, res)], res)[0]
        self.images, self.texts = {}, {}
        for i, p in enumerate(prompts):
            other = prompts[(i + len(prompts) // 2) % len(prompts)]
            self.images[p["prompt"]] = answer("gen", p, render(p["scene"]), render(other["scene"]))
        for i, s in enumerate(scenes):
            other = scenes[(i + 1) % len(scenes)]
            image = key(s["image"])
            self.images[s["instruction"], image] = answer("edit", s, from_pil([s["target_image"]], res)[0],
                                                          from_pil([other["target_image"]], res)[0])
            self.texts["", image] = answer("caption", s, s["caption"], other["caption"])
            self.texts[s["question"], image] = answer("vqa", s, s["answer"], other["answer"])
        self.key = lambda x: x.numpy().tobytes()

    def generate_images(self, texts, num_iter=16, guidance=3.0, temperature=1.0, diffusion_steps=50, und_images=None,
                        generator=None):
        und = und_images
        return torch.stack([self.images[t] if und is None else self.images[t, self.key(u)]
                            for t, u in zip(texts, und if und is not None else texts)])

    def generate_text(self, images, prompts, max_new_tokens):
        return [self.texts[p, self.key(im)] for im, p in zip(images, prompts)]

    def decode(self, latents):        # the VAE
        return latents


def evaluate_with(answer, n_per_task=12):
    oracle = Oracle(n_per_task, answer)
    return S.evaluate_shapes(oracle, oracle, n_per_task, seed=0, log=lambda *a: None, num_iter=1, guidance=1.0,
                             temperature=1.0, diffusion_steps=1)


def test_evaluate_shapes_scores_true_outputs_1_and_shuffled_ones_low():
    """72 prompts (two generation batches of at most 64) and 24 scenes through the real evaluate_shapes."""
    true = evaluate_with(lambda kind, item, truth, other: truth)
    kinds = {k for k in true if k.startswith("vqa/")}
    assert len(kinds) >= 4 and {k[4:] for k in kinds} <= set(S.VQA_KINDS)
    assert all(v == 1.0 for k, v in true.items()), true
    assert set(true) == {"gen_accuracy", *(f"gen/{t}" for t in S.TASKS), "gen_heldout_pairs", "gen_seen_pairs",
                         "caption_accuracy", "caption_heldout_pairs", "vqa_accuracy", "edit_accuracy", *kinds}
    shuffled = evaluate_with(lambda kind, item, truth, other: other)
    assert set(shuffled) == set(true)
    assert all(v <= 0.5 for k, v in shuffled.items() if not k.startswith(("vqa", "caption"))), shuffled
    assert shuffled["caption_accuracy"] < 0.5 and shuffled["caption_heldout_pairs"] < 0.5, shuffled
    assert shuffled["vqa_accuracy"] <= 0.5 and all(shuffled[k] < 1 for k in kinds), shuffled


def test_evaluate_shapes_keeps_held_out_and_seen_pairs_apart():
    """True outputs only for items with a held-out colour-shape pair: their keys read 1, the seen ones low."""
    held = lambda item: item["heldout"]
    out = evaluate_with(lambda kind, item, truth, other: truth if held(item) else other)
    assert out["gen_heldout_pairs"] == 1.0 and out["gen_seen_pairs"] <= 0.5, out
    assert out["caption_heldout_pairs"] == 1.0 and out["caption_accuracy"] < 0.9, out
    out = evaluate_with(lambda kind, item, truth, other: other if held(item) else truth)
    assert out["gen_heldout_pairs"] <= 0.5 and out["gen_seen_pairs"] == 1.0, out
    assert out["caption_heldout_pairs"] < 0.7 and out["caption_accuracy"] < 1, out


def test_evaluate_shapes_scores_each_vqa_kind_on_its_own_questions():
    """True answers to half the kinds of question, other items' answers to the rest (then the other
    way round): each kind's key reads 1 exactly when its own questions were answered right."""
    kinds = sorted({S.vqa_kind(s["question"]) for s in S.eval_scenes(24, seed=0, split="test")})
    assert len(kinds) >= 4
    for right in (set(kinds[::2]), set(kinds[1::2])):
        out = evaluate_with(lambda k, item, truth, other: truth if k != "vqa" or S.vqa_kind(item["question"]) in right
                            else other)
        assert {k: out[f"vqa/{k}"] == 1.0 for k in kinds} == {k: k in right for k in kinds}, out
