"""sample.py from the command line, on a tiny checkpoint that train.py writes in seconds.

Bad inputs and what happens (README table of that name):
    no checkpoint in --out_dir        exit 1, "no checkpoint at DIR/ckpt.pt: train one with `python train.py ...`"
    --image of a non-image file       exit 1, "cannot read PATH as an image (UnidentifiedImageError: ...)"
    --image of a missing file         exit 1, "cannot read PATH as an image (FileNotFoundError: ...)"
    --image of a decompression bomb   exit 1, "cannot read PATH as an image (DecompressionBombError: ...)"
    a truncated or corrupt image      exit 1, "cannot read PATH as an image (OSError: ...)"
    a corrupt checkpoint              exit 1, "cannot load checkpoint PATH: ..."
    unwritable --out                  exit 1, "cannot write PATH: ..."; the PNG is written to a temporary
                                      file and renamed, so readers never see half an image
    a 1x1 image                       resized as in training: a caption
    prompt longer than max_text_len   truncated, with a warning naming both lengths
    empty prompt                      an unconditional sample, with a note saying so
    non-ASCII / emoji prompt          byte fallback of the tokenizer: an image
    --device tpu, --num_images 0      argparse error (exit 2)
    --no-ema                          the raw weights instead of the EMA (tests/test_reliability.py)
"""
import json
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--num_iter", "4", "--diffusion_steps", "5"]   # a few reveal and diffusion steps: seconds on CPU
# one thread: a tiny model's matmuls gain nothing from two, and lose a lot when the cores are shared
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args, ok=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny model trained for 2 steps by the real train.py, with an untrained VAE (training one takes minutes)."""
    import torch
    from vae import AutoencoderKL, VAEConfig, save_vae
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_vae(AutoencoderKL(VAEConfig.preset("shapes")), str(d / "vae.pt"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--model", "tiny", "--vae", d / "vae.pt",
                        "--max_steps", "100", "--stop_at", "2", "--batch_size", "8", "--out_dir", d / "run",
                        "--num_iter", "1", "--diffusion_steps", "1", "--vit_pretrain", "0"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # two steps leave a decoder whose residual stream repeats the last input token (an empty answer) and a
    # diffusion head that outputs ~0, under which a broken KV or prefix cache would still give the same
    # text and images: scale the decoder blocks' outputs up and spread the head's weights, so both matter
    ckpt = torch.load(d / "run" / "ckpt.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    for weights in (ckpt["model"], ckpt["ema"]):
        for name, w in weights.items():
            if name.startswith("llm.layers.") and "post_" in name and name.endswith("norm.weight"):
                w.fill_(10.0)
            elif name.startswith("diffusion.") and w.is_floating_point():
                w.add_(torch.randn(w.shape, generator=g) * 0.05)
    torch.save(ckpt, d / "run" / "ckpt.pt")
    return d / "run"


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from data.shapes import random_scene, render
    path = tmp_path_factory.mktemp("img") / "scene.png"
    render(random_scene(np.random.default_rng(0)), 48).save(path)   # not the model's 32 px: resized as in training
    return path


def pixels(path):
    return np.asarray(Image.open(path))


def test_text_to_image_grid_and_seed(ckpt, tmp_path):
    """A row per prompt, --num_images columns, 32 px cells; same seed -> same PNG; --no_cache -> the same
    image up to float rounding (the cached and recomputed prompt keys are equal to ~1e-6, which can move a
    pixel by one 8-bit level; a broken cache moves most pixels by many)."""
    a, b, c, d = (tmp_path / f"{n}.png" for n in "abcd")
    prompts = ["--prompt", "a red circle above a blue square", "--prompt", "", "--prompt", "un cercle rouge ✨"]
    p = run("--out_dir", ckpt, *prompts, "--num_images", 2, "--out", a, *FAST)
    assert p.stdout.strip() == str(a)
    assert "unconditional" in p.stderr
    assert Image.open(a).size == (2 * 32, 3 * 32)
    run("--out_dir", ckpt, *prompts, "--num_images", 2, "--out", b, *FAST)
    run("--out_dir", ckpt, *prompts, "--num_images", 2, "--out", c, *FAST, "--no_cache")
    run("--out_dir", ckpt, *prompts, "--num_images", 2, "--out", d, *FAST, "--seed", 1)
    assert np.array_equal(pixels(a), pixels(b)), "same seed must give the same image"
    diff = np.abs(pixels(a).astype(int) - pixels(c).astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, ("the prefix cache must not change the image",
                                                          diff.max(), (diff > 0).mean())
    assert not np.array_equal(pixels(a), pixels(d)), "another seed should give another image"


def test_reveal_frames_end_on_the_sample(ckpt, tmp_path):
    """--reveal: one frame per reveal step, the first with the not-yet-drawn slots grey, the last exactly the
    sample; the sample itself is the one drawn without --reveal (same seed)."""
    from sample import REVEAL_BAND, REVEAL_CELL, REVEAL_GAP
    plain, a, b = tmp_path / "plain.png", tmp_path / "a.png", tmp_path / "b.png"
    prompts = ["--prompt", "a red circle", "--prompt", "two blue squares", "--num_images", 2, *FAST]
    run("--out_dir", ckpt, *prompts, "--out", plain)
    p = run("--out_dir", ckpt, *prompts, "--out", a, "--reveal", tmp_path / "reveal.png")
    assert p.stdout.split() == [str(a), str(tmp_path / "reveal.png")]
    run("--out_dir", ckpt, *prompts, "--out", b, "--reveal", tmp_path / "reveal.gif")
    sample = pixels(plain)
    assert np.array_equal(pixels(a), sample) and np.array_equal(pixels(b), sample), "--reveal changed the sample"
    with Image.open(tmp_path / "reveal.gif") as gif:
        assert gif.n_frames == 4                                              # FAST: 4 reveal steps
    s = -(-REVEAL_CELL // 32)                                                 # 32 px images, upscaled s times
    fw, fh = 2 * 32 * s, REVEAL_BAND + 2 * 32 * s                             # a frame: 2 x 2 images under a label
    strip = pixels(tmp_path / "reveal.png")
    assert strip.shape == (fh, 4 * fw + 3 * REVEAL_GAP, 3)
    frame = lambda k: strip[REVEAL_BAND:, k * (fw + REVEAL_GAP):k * (fw + REVEAL_GAP) + fw][::s, ::s]
    assert np.array_equal(frame(3), sample), "the last frame must be the sample"
    slots = frame(0)[:32, :32].reshape(4, 8, 4, 8, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
    assert sum((slot == 128).all() for slot in slots) == 14    # floor(16 cos(pi/8)) slots still masked after step 1


def test_prompts_file_and_default_out(ckpt, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\ntwo blue squares\n")
    p = run("--out_dir", ckpt, "--prompts", f, *FAST)
    assert p.stdout.strip() == str(ckpt / "sample.png")
    assert Image.open(ckpt / "sample.png").size == (32, 2 * 32)


def test_caption_answer_and_long_prompt(ckpt, scene):
    """--image prints a caption; with --question an answer; an over-long question is truncated with a warning."""
    cap = run("--out_dir", ckpt, "--image", scene, "--max_new_tokens", 6)
    assert cap.stdout.endswith("\n") and cap.stderr == ""
    q = "what color is the " + "very " * 40 + "big circle"
    ans = run("--out_dir", ckpt, "--image", scene, "--question", q, "--max_new_tokens", 6)
    said = re.search(r"prompt is (\d+) tokens but the model reads at most 16: truncated", ans.stderr)
    assert said and int(said.group(1)) > 16, ans.stderr                  # both lengths
    assert len(ans.stdout.strip()) > 1, "a one-token answer would not read the KV cache"
    same = run("--out_dir", ckpt, "--image", scene, "--question", q, "--max_new_tokens", 6, "--no_cache")
    assert same.stdout == ans.stdout, "the KV cache must not change the answer"


def test_edit_writes_image(ckpt, scene):
    """Without --out the edited image goes to OUT_DIR/edit.png."""
    p = run("--out_dir", ckpt, "--image", scene, "--edit", "make the circle green", *FAST)
    assert p.stdout.strip() == str(ckpt / "edit.png") and Image.open(ckpt / "edit.png").size == (32, 32)


def one_line_error(p, code, *words):
    """A failed run: exit `code`, and stderr is one line holding `words` (argparse: the usage, then one line)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
    assert (len(lines) == 1 if code == 1 else lines[0].startswith("usage:")), p.stderr
    assert all(w in lines[-1] for w in words), p.stderr


def test_errors_are_one_sentence(ckpt, tmp_path):
    one_line_error(run("--out_dir", tmp_path / "nothing", "--prompt", "a red circle", ok=False), 1,
                   "no checkpoint", "python train.py")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    one_line_error(run("--out_dir", ckpt, "--image", not_image, ok=False), 1, "cannot read", str(not_image))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"                                        # a header claiming 30000 x 30000 pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    one_line_error(run("--out_dir", ckpt, "--image", bomb, ok=False), 1, "DecompressionBombError", str(bomb))
    unwritable = not_image / "out.png"                                  # a folder that is a file
    one_line_error(run("--out_dir", ckpt, "--prompt", "a red circle", "--out", unwritable, *FAST, ok=False), 1,
                   f"cannot write {unwritable}")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")                 # a 1x1 image is still an image
    run("--out_dir", ckpt, "--image", tmp_path / "dot.png", "--max_new_tokens", 2)
    one_line_error(run("--out_dir", ckpt, "--prompt", "x", "--device", "tpu", ok=False), 2, "invalid choice")
    one_line_error(run("--out_dir", ckpt, "--prompt", "x", "--num_images", 0, ok=False), 2, "--num_images",
                   "must be > 0")
    one_line_error(run("--out_dir", ckpt, "--bench", "--compare", "16/50", ok=False), 2, "REVEAL/HEAD/SAMPLER")
    one_line_error(run("--out_dir", ckpt, "--prompt", "x", "--sampler", "ddim", "--temperature", "0.5", ok=False), 2,
                   "ddim adds none")


def test_bench_prints_figures(ckpt):
    p = run("--out_dir", ckpt, "--bench", "--num_images", 2, "--num_iter", 2, "--diffusion_steps", 2,
            "--max_new_tokens", 4, "--compare", "1/3/ddim")
    out = p.stdout
    assert out.count("images/s") == 5 and out.count("tokens/s") == 2
    rows = json.loads(next(l for l in out.splitlines() if '"compare"' in l))["rows"]
    assert [r["setting"] for r in rows] == ["2/2/ddpm", "1/3/ddim"]
    assert all(0 < r["trunk"] < 1 and 0 < r["head"] < 1 and r["trunk"] + r["head"] <= 1 for r in rows)
    # each path against the prefix-cached (kv-cached) one, which is not compared with itself
    assert out.count("outputs identical") == 3, "cache on/off and batched/separate CFG must agree exactly"


def test_bench_of_an_untrained_preset(tmp_path):
    """--bench --model PRESET times a preset without a checkpoint (any --out_dir); --model alone is an error."""
    p = run("--out_dir", tmp_path / "nothing", "--bench", "--model", "tiny", "--num_images", 1, "--num_iter", 2,
            "--max_new_tokens", 2)
    result = json.loads(p.stdout.splitlines()[-1])
    assert result["result"] == "bench" and result["t2i_images_per_s"]["cached"] > 0
    assert "0.24M params" in p.stdout
    one_line_error(run("--model", "tiny", "--prompt", "x", ok=False), 2, "--model", "--bench")
