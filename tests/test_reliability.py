"""Reliability and safety: bad input never crashes a run or loses work, untrusted files never
run code. Each test feeds one kind of bad input to the code a user runs and checks what the README's
table "Bad inputs and what happens" promises: the input is skipped and counted, or the program says in
one sentence what is wrong (no traceback), and a checkpoint on disk is always whole.

One tiny run of the real train.py, stopped by SIGTERM, gives the checkpoint the other tests read.
"""
import argparse
import ast
import glob
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
import unifluid
import vae as vae_mod
from data import build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
FAST = ["--model", "tiny", "--batch_size", "8", "--warmup", "5", "--log_interval", "1", "--eval_interval", "1000",
        "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2",
        "--vit_pretrain", "2", "--vit_pretrain_batch", "8"]
SAMPLE_FAST = ["--num_iter", "2", "--diffusion_steps", "2", "--max_new_tokens", "3"]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory, vae_path, child):
    """train.py in a subprocess, sent SIGTERM once its handler is installed and two steps are logged:
    (exit code, stdout, stderr, out_dir)."""
    out = tmp_path_factory.mktemp("run")
    proc = child([sys.executable, "train.py", *FAST, "--vae", vae_path, "--out_dir", str(out),
                  "--max_steps", "100000"], cwd=ROOT, env=ENV)
    proc.wait_for(r"^Ctrl-C or SIGTERM: ", 120)
    proc.wait_for(r"^step 2/100000 \|", 120)
    proc.proc.send_signal(signal.SIGTERM)
    return (*proc.finish(120), out)


@pytest.fixture(scope="module")
def run_dir(sigterm_run):
    code, _, stderr, out = sigterm_run
    assert code == 0, stderr[-3000:]
    return out


def one_sentence(exc_info):
    """The message a SystemExit prints: one line, no traceback."""
    msg = exc_info.value.code
    assert isinstance(msg, str) and "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg


# ----------------------------------------------------------------------------- data

def encode(mode="RGB", color=(255, 0, 0), fmt="PNG", size=(24, 20), **save):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(w, h):
    """A PNG whose header claims w x h pixels and holds none: a decompression bomb costs nothing to write."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + png_chunk(b"IEND", b""))


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def good_members(keys):
    return [m for k in keys for m in ((f"{k}.jpg", encode(fmt="JPEG")), (f"{k}.txt", f"a red square {k}".encode()))]


def test_bad_samples_and_shards_are_skipped_and_counted_by_reason(tmp_path):
    noisy = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG")
    odd_modes = {  # every mode decodes to RGB: (bytes, the RGB it should come out as, or None)
        "grey": (encode("L", 128), (128, 128, 128)), "rgba": (encode("RGBA", (0, 0, 255, 0)), (255, 255, 255)),
        "palette": (encode("P", 3), None), "palette_alpha": (encode("P", 0, transparency=0), (255, 255, 255)),
        "cmyk": (encode("CMYK", (0, 255, 255, 0), fmt="JPEG"), (255, 0, 0)),
        "sixteen_bit": (encode("I;16", 32768), (128, 128, 128))}
    members = [m for k, (data, _) in odd_modes.items() for m in ((f"{k}.png", data), (f"{k}.txt", k.encode()))]
    members += [("corrupt.jpg", buf.getvalue()[:len(buf.getvalue()) // 2]), ("corrupt.txt", b"half a jpeg"),
                ("garbage.jpg", b"\xff\xd8 not really"), ("garbage.txt", b"garbage"),
                ("bomb.png", png_header_only(30000, 30000)), ("bomb.txt", b"a bomb"),        # 900 Mpixel header
                ("empty.jpg", encode(fmt="JPEG")), ("empty.txt", b" \n\t "),
                ("latin1.jpg", encode(fmt="JPEG")), ("latin1.txt", "caf\xe9".encode("latin-1")),
                ("nocaption.jpg", encode(fmt="JPEG")), ("noimage.txt", b"no image")]
    write_tar(tmp_path / "00000.tar", members)
    write_tar(tmp_path / "full.tar", good_members(range(8)))
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:len(data) // 2 + 100])                     # cut mid-member
    (tmp_path / "full.tar").unlink()
    ds = build_dataset("wds", str(tmp_path), split="train", holdout=0, epochs=1, resolution=16)  # one pass, all
    with pytest.warns(UserWarning):
        out = {(e["prompt"] or e["answer"]): (e["output_image"] if e["task"] == "t2i" else e["input_image"])
               for e in ds}
    assert set(odd_modes) <= set(out) and len(out) == ds.stats["samples"] >= len(odd_modes) + 1
    for k, (_, rgb) in odd_modes.items():
        if rgb is not None:
            got = ((out[k] + 1) * 127.5).mean((1, 2))
            assert torch.allclose(got, torch.tensor(rgb, dtype=torch.float32), atol=12), (k, got)
    assert {r: c for r, c in ds.stats.items() if r != "samples"} == {
        "corrupt_image": 2, "oversized_image": 1, "empty_caption": 1, "bad_caption_encoding": 1,
        "missing_caption": 1, "missing_image": 1, "truncated_shard": 1}


@pytest.mark.parametrize("layout", ["wds", "files"])
def test_a_shard_deleted_mid_run_is_skipped_and_the_stream_goes_on(tmp_path, layout):
    for s in range(3):
        if layout == "wds":
            write_tar(tmp_path / f"{s:05d}.tar", good_members(range(4 * s, 4 * s + 4)))
        else:
            os.makedirs(tmp_path / f"{s:05d}")
            for name, data in good_members(range(4 * s, 4 * s + 4)):
                (tmp_path / f"{s:05d}" / name).write_bytes(data)
    ds = build_dataset(layout, str(tmp_path), split="train", resolution=16, shuffle_buffer=4)   # endless epochs
    it = iter(ds)
    next(it)
    victim = tmp_path / ("00001.tar" if layout == "wds" else "00001")
    victim.unlink() if layout == "wds" else shutil.rmtree(victim)
    with pytest.warns(UserWarning, match="00001"):
        seen = [next(it)["prompt"] or "caption" for _ in range(40)]                      # ~4 more epochs
    assert len(seen) == 40 and ds.stats["missing_shard"] >= 2


def test_train_counts_skipped_samples_in_its_log(tmp_path, vae_path):
    write_tar(tmp_path / "00000.tar", good_members(range(12)) + [("bad.jpg", b"not a jpeg"), ("bad.txt", b"x")])
    train.main([*FAST, "--vae", vae_path, "--dataset", "wds", "--data_dir", str(tmp_path), "--resolution", "32",
                "--max_steps", "100", "--stop_at", "3", "--out_dir", str(tmp_path / "out")])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl") if '"loss"' in line]
    assert [r["step"] for r in log] == [1, 2, 3] and log[-1]["data_skipped"] >= 1


@pytest.mark.parametrize("vae_first", [False, True], ids=["training", "vae_training_first"])
def test_a_dataset_where_everything_is_bad_stops_train_with_one_sentence(tmp_path, vae_path, vae_first):
    """Whether the bad data is met by the model's training or, without --vae, by the VAE's training first."""
    write_tar(tmp_path / "00000.tar", [m for i in range(6) for m in ((f"{i}.jpg", b"\xff\xd8 broken"),
                                                                     (f"{i}.txt", b"a red circle"))])
    vae_flags = ["--vae_steps", "2"] if vae_first else ["--vae", vae_path]
    with pytest.raises(SystemExit) as e:
        train.main([*FAST, *vae_flags, "--dataset", "wds", "--data_dir", str(tmp_path), "--resolution", "32",
                    "--max_steps", "3", "--out_dir", str(tmp_path / "runs" / "out")])
    assert "no readable sample" in one_sentence(e) and "corrupt_image 6" in e.value.code
    assert not os.path.exists(tmp_path / "runs" / "vae" / "vae.pt")


# ----------------------------------------------------------------------------- checkpoints

def test_sigterm_during_training_saves_a_checkpoint_and_exits_cleanly(sigterm_run, run_dir):
    _, stdout, stderr, _ = sigterm_run
    assert "stopped by SIGTERM" in stdout and "--init_from resume" in stdout and "Traceback" not in stderr
    ckpt = unifluid.read_checkpoint(str(run_dir))
    assert ckpt["step"] >= 2 and not os.path.exists(run_dir / "ckpt.pt.tmp")


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(run_dir, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    shutil.copy(run_dir / "ckpt.pt", path)
    model, _, tokenizer, ckpt = unifluid.load_checkpoint(path)

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        unifluid.save_checkpoint(path, model, None, None, 999, tokenizer, ckpt["vae"], argparse.Namespace())
    assert unifluid.read_checkpoint(path)["step"] == ckpt["step"]      # the half-written file was the .tmp


SAVER = """
import os, sys, time, argparse, torch
torch.set_num_threads(1)
import unifluid
src, dst, n, hang_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model, _, tokenizer, ckpt = unifluid.load_checkpoint(src)
args, step = argparse.Namespace(**ckpt["args"]), 0
real_fsync = os.fsync

def fsync(fd):   # save number hang_at stops with its .tmp file written and not yet renamed: a kill lands mid-save
    real_fsync(fd)
    if step == hang_at:
        print("mid-save", flush=True)
        time.sleep(3600)
os.fsync = fsync
while True:      # a large-ish checkpoint, saved back to back; pad is filled with its step to check wholeness
    step += 1
    unifluid.save_checkpoint(dst, model, None, None, step, tokenizer, ckpt["vae"], args, pad=torch.full((n,), float(step)))
    print(step, flush=True)
"""


def start_saver(child, run_dir, dst, n, hang_at=0):
    """A process saving checkpoints to dst back to back; with hang_at, it stops inside that save."""
    proc = child([sys.executable, "-c", SAVER, str(run_dir), str(dst), str(n), str(hang_at)], cwd=ROOT, env=ENV)
    proc.wait_for(r"^1$", 120)                                                       # one whole save first
    return proc


def check_whole(ckpt):
    assert ckpt["pad"][0] == ckpt["pad"][-1] == ckpt["step"] and "model" in ckpt


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(run_dir, tmp_path, child):
    dst = tmp_path / "ckpt.pt"
    for hang_at in (2, 3):                 # the kill lands inside save 2 (or 3), after save 1 (or 2) completed
        proc = start_saver(child, run_dir, dst, 8_000_000, hang_at)                  # 32 MB of padding
        proc.wait_for(r"^mid-save$", 120)
        assert os.path.exists(str(dst) + ".tmp"), "the saver did not stop inside a save"
        proc.proc.kill()                                                             # SIGKILL: no handler runs
        proc.finish(60)
        model, _, _, ckpt = unifluid.load_checkpoint(str(dst))
        check_whole(ckpt)
        assert ckpt["step"] == hang_at - 1                                           # the last whole save


def test_reads_while_another_process_rewrites_the_checkpoint_always_succeed(run_dir, tmp_path, child):
    """train.py saving (the real save_checkpoint, in a loop) while this process and sample.py read."""
    dst = tmp_path / "ckpt.pt"
    proc = start_saver(child, run_dir, dst, 1_000_000)
    try:
        reader = subprocess.Popen([sys.executable, "sample.py", "--out_dir", str(dst), "--prompt", "a red circle",
                                   "--out", str(tmp_path / "s.png"), *SAMPLE_FAST], cwd=ROOT, env=ENV,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        steps, deadline = set(), time.time() + 300      # read until the writer has rewritten it 3 times
        while len(steps) < 3 and time.time() < deadline:
            ckpt = unifluid.read_checkpoint(str(dst))
            check_whole(ckpt)
            steps.add(ckpt["step"])
        _, err = reader.communicate(timeout=120)
        assert reader.returncode == 0 and "Traceback" not in err, err[-2000:]
    finally:
        proc.proc.kill()
        proc.finish(60)
    assert len(steps) >= 3, "the writer did not rewrite the file while we read"


RACE = """
import glob, os, sys, time
import sample
out, real_replace = sys.argv[1], os.replace

def replace(src, dst):      # both processes reach the rename with their whole PNG written, then both rename
    if dst == out:
        with open(src, "rb") as f, open(src[:-len(".tmp")] + ".whole", "wb") as g:
            g.write(f.read())                                   # what this process wrote, for the test
        open(src[:-len(".tmp")] + ".ready", "w").close()
        end = time.time() + 120
        while len(glob.glob(out + ".*.ready")) < 2:
            if time.time() > end:
                sys.exit("the other sample.py never reached its rename")
            time.sleep(0.01)
    real_replace(src, dst)
os.replace = replace
sample.main(sys.argv[2:])
"""


def test_two_sample_processes_on_one_checkpoint(run_dir, tmp_path):
    """Two sample.py processes write the same --out, forced to rename at the same moment: the file is
    one whole PNG, pixel for pixel the one either process drew, and no temporary file is left."""
    out = tmp_path / "same.png"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(out), "--out_dir", str(run_dir), "--prompt", p,
                               "--out", str(out), *SAMPLE_FAST], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in ("a red circle", "two blue squares")]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    drawn = [np.asarray(Image.open(f)) for f in glob.glob(str(out) + ".*.whole")]
    assert len(drawn) == 2 and len(glob.glob(str(out) + ".*.ready")) == 2          # both waited for the other
    final = np.asarray(Image.open(out))                                             # decodes whole
    assert final.shape == (32, 32, 3) and any(np.array_equal(final, d) for d in drawn)
    assert not glob.glob(str(out) + ".*.tmp")


def test_resume_without_a_checkpoint_or_from_another_config_says_which_and_why(run_dir, tmp_path, vae_path):
    resume = lambda out, *flags: train.main(["--init_from", "resume", "--out_dir", str(out), *flags])
    with pytest.raises(SystemExit) as e:
        resume(tmp_path / "empty")
    assert "no checkpoint at" in one_sentence(e) and "python train.py" in e.value.code
    with pytest.raises(SystemExit) as e:                       # the run is tiny: --model small cannot apply
        resume(run_dir, "--model", "small")
    assert "trained with --model 'tiny', not 'small'" in one_sentence(e) and "drop --model" in e.value.code
    for flag, value in (("--model_args", "d_model=64"), ("--tokenizer", "byte")):   # the architecture is fixed
        with pytest.raises(SystemExit) as e:
            resume(run_dir, flag, value)
        assert f"not '{value}'" in one_sentence(e) and f"drop {flag}" in e.value.code
    with pytest.raises(SystemExit) as e:
        resume(run_dir, "--resolution", "64")
    assert "32 px" in one_sentence(e) and "--resolution 64" in e.value.code
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    for name, change, words in [("newer", dict(config={**ckpt["config"], "flux_capacitor": 1}), "another version"),
                                ("reshaped", dict(config={**ckpt["config"], "d_model": 2 * ckpt["config"]["d_model"]}),
                                 "do not match"),
                                ("not_ours", None, "not a train.py checkpoint")]:
        os.makedirs(tmp_path / name)
        torch.save({**ckpt, **change} if change else {"state_dict": ckpt["model"]}, tmp_path / name / "ckpt.pt")
        with pytest.raises(SystemExit) as e:
            resume(tmp_path / name)
        assert words in one_sentence(e), e.value.code
    assert unifluid.read_checkpoint(str(run_dir))["step"] == ckpt["step"]      # nothing was written to the run


# ----------------------------------------------------------------------------- untrusted files

def test_every_torch_load_in_the_sources_is_weights_only():
    sources = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "data", "*.py"))
    calls = []
    for path in sources:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                calls.append((os.path.basename(path), node.lineno, ok))
    assert calls and all(ok for *_, ok in calls), [c for c in calls if not c[2]]


class Payload:
    """Unpickling this would create a directory: proof that the file ran code."""
    marker = None

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_that_runs_code_is_refused(run_dir, tmp_path):
    Payload.marker = str(tmp_path / "pwned")
    evil_zip, evil_raw = tmp_path / "evil" / "ckpt.pt", tmp_path / "raw.pt"
    os.makedirs(evil_zip.parent)
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model": Payload()}, evil_zip)                   # torch's zip format
    evil_raw.write_bytes(pickle.dumps({"config": Payload()}))            # a bare pickle
    for load in (lambda: unifluid.read_checkpoint(str(evil_zip)), lambda: unifluid.load_checkpoint(str(evil_zip)),
                 lambda: vae_mod.load_vae(str(evil_raw)), lambda: vae_mod.load_vae("mar:" + str(evil_raw))):
        with pytest.raises(ValueError, match="cannot be read as PyTorch weights"):
            load()
    p = subprocess.run([sys.executable, "sample.py", "--out_dir", str(evil_zip.parent), "--prompt", "x"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "cannot load checkpoint" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not os.path.exists(Payload.marker), "unpickling ran code"


def legacy_size_bomb():
    """An old-format (non-zip) torch file whose one storage claims 2**40 floats (4 TB)."""
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=False)
    b, needle = buf.getvalue(), struct.pack("<q", 4) + struct.pack("<4f", 0, 1, 2, 3)
    i = b.index(needle)
    return b[:i] + struct.pack("<q", 1 << 40) + b[i + 8:]


def test_malformed_checkpoints_give_a_clear_error(run_dir, tmp_path):
    whole = (run_dir / "ckpt.pt").read_bytes()
    cases = {"truncated": whole[:len(whole) // 2], "empty": b"", "noise": os.urandom(4096),
             "size_bomb": legacy_size_bomb(), "text": b"not a checkpoint\n"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        for load in (unifluid.read_checkpoint, vae_mod.load_vae):
            with pytest.raises(ValueError, match="cannot be read as PyTorch weights") as e:
                load(str(path))
            assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--init_from", str(tmp_path / "truncated.pt"), "--out_dir", str(tmp_path / "x")])
    assert "cannot be read" in one_sentence(e)


def test_malformed_safetensors_are_refused_before_the_library_reads_them(tmp_path, monkeypatch):
    pytest.importorskip("safetensors", reason="optional extra: pip install safetensors")
    from safetensors.torch import save_file
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(good))
    assert torch.equal(unifluid.read_safetensors(str(good))["w"], torch.arange(1000, dtype=torch.float32))
    b = good.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    header["w"]["data_offsets"] = [0, 1 << 40]
    lying = json.dumps(header).encode()
    cases = {"empty": b"", "short": b[:5], "truncated": b[:len(b) // 2],
             "huge_header_length": struct.pack("<Q", 1 << 62) + b[8:],            # would be an 4 EB allocation
             "header_past_end": struct.pack("<Q", len(b)) + b[8:], "not_json": struct.pack("<Q", 4) + b"{{{{",
             "offsets_past_end": struct.pack("<Q", len(lying)) + lying + b[8 + n:]}
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a: pytest.fail("the library saw a bad file"))
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        said = "is truncated or malformed" if name in ("truncated", "offsets_past_end") else "is not a safetensors file"
        with pytest.raises(ValueError, match=said) as e:     # the words, not the file name, which holds both
            unifluid.read_safetensors(str(path))
        assert str(e.value).startswith(str(path)), e.value
    hf = tmp_path / "gemma"                   # as train.py --init_from gemma:DIR reads it
    os.makedirs(hf)
    (hf / "config.json").write_text("{}")
    shutil.copy(tmp_path / "truncated.safetensors", hf / "model.safetensors")
    with pytest.raises(ValueError, match="is truncated or malformed"):
        unifluid.read_hf_folder(str(hf))


# ----------------------------------------------------------------------------- numerics

def test_nan_steps_are_skipped_counted_and_a_run_of_them_stops_cleanly(run_dir, tmp_path, vae_path, diverge_at):
    diverge_at(range(2, 20), max_bad=3)
    with pytest.raises(SystemExit) as e:
        train.main([*FAST, "--vae", vae_path, "--out_dir", str(tmp_path), "--max_steps", "20"])
    assert "NaN/inf for 3 steps in a row" in one_sentence(e) and "--init_from resume" in e.value.code
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"loss"' in line]
    assert [r["skipped"] for r in log] == [0, 0, 1, 2]                  # steps 1-2 good, 3-4 skipped, 5th stops
    assert all(r["loss"] == r["loss"] for r in log[:2])


# ----------------------------------------------------------------------------- sample.py inputs

def write_big_png(path, side):
    """A side x side grey PNG without holding it in memory: zero rows, compressed a block at a time."""
    z, rows = zlib.compressobj(1), b"\x00" * ((side + 1) * 500)
    idat = b"".join(z.compress(rows) for _ in range(side // 500)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "notes.png").write_text("not an image, whatever the name says")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "dot.png")
    write_big_png(d / "huge.png", 8000)
    (d / "bomb.png").write_bytes(png_header_only(30000, 30000))
    whole = encode(size=(64, 64))
    (d / "cut.png").write_bytes(whole[:len(whole) // 2])
    for mode, color in (("RGBA", (0, 0, 255, 0)), ("CMYK", (0, 255, 255, 0)), ("I;16", 40000), ("P", 5)):
        Image.new(mode, (40, 30), color).save(d / f"{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    return d


@pytest.mark.parametrize("flags, expect", [
    (["--prompt", ""], "png"),
    (["--prompt", "a red circle " * 2000], "png"),                      # ~6000 tokens: truncated with a warning
    (["--prompt", "un cercle rouge ✨🟥, 日本語の四角, ẞ͕̈"], "png"),
    (["--prompts", "{d}/latin1.txt"], "cannot read prompts"),
    (["--image", "{d}/notes.png"], "cannot read"),
    (["--image", "{d}/missing.png"], "cannot read"),
    (["--image", "{d}/cut.png"], "cannot read"),
    (["--image", "{d}/bomb.png"], "DecompressionBombError"),
    (["--image", "{d}/dot.png"], "text"),
    (["--image", "{d}/huge.png"], "text"),
    (["--image", "{d}/RGBA.png", "--question", "what color is it?"], "text"),
    (["--image", "{d}/CMYK.jpg"], "text"),
    (["--image", "{d}/I16.png"], "text"),
    (["--image", "{d}/P.png", "--edit", "make it green 🎨"], "png"),
], ids=["empty", "long", "unicode", "non_utf8_prompts", "not_image", "missing", "truncated", "bomb", "1x1", "8000px",
        "rgba", "cmyk", "16bit", "palette_edit"])
def test_sample_inputs_give_output_or_one_sentence(run_dir, images, tmp_path, capsys, flags, expect):
    out = tmp_path / "o.png"
    argv = ["--out_dir", str(run_dir), "--out", str(out), *SAMPLE_FAST, *(f.format(d=images) for f in flags)]
    if expect in ("png", "text"):
        sample.main(argv)
        cap = capsys.readouterr()
        # a PNG, or a caption line (an untrained model's caption may be empty)
        assert Image.open(out).size[0] % 32 == 0 if expect == "png" else cap.out.endswith("\n")
        assert "truncated" in cap.err if len(flags[1]) > 1000 else "Traceback" not in cap.err
    else:
        with pytest.raises(SystemExit) as e:
            sample.main(argv)
        assert expect in one_sentence(e) and e.value.code.startswith("error: ")


def test_sample_reads_the_ema_weights_unless_no_ema(run_dir):
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) for k in ckpt["model"])
    for flags, want in (([], "ema"), (["--no-ema"], "model")):
        model = sample.load(sample.parse_args(["--out_dir", str(run_dir), "--prompt", "x", "--device", "cpu", *flags]))[0]
        state = model.state_dict()
        assert all(torch.equal(state[k], ckpt[want][k]) for k in ckpt[want]), flags


# ----------------------------------------------------------------------------- tar shards cut anywhere

@pytest.mark.parametrize("cut, n", [("member_boundary", 2), ("mid_header", 2), ("mid_member", 3)])
def test_a_tar_shard_cut_anywhere_gives_its_whole_samples_and_counts_the_cut(tmp_path, cut, n):
    """A download cut at a member boundary (no end-of-archive blocks), inside a 512-byte header, or inside
    a member's data: the samples before the cut are read, and the shard is counted truncated once. When
    the cut leaves no whole header of the 4th sample, the 3rd is dropped too: nothing says it was complete."""
    write_tar(tmp_path / "full.tar", good_members(range(6)))
    data = (tmp_path / "full.tar").read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tf:
        members = tf.getmembers()
    fourth = members[6]                  # the 4th sample's image: samples 0-2 are whole before it
    at = {"member_boundary": fourth.offset, "mid_header": fourth.offset + 100,
          "mid_member": fourth.offset_data + fourth.size // 2}[cut]
    (tmp_path / "00000.tar").write_bytes(data[:at])
    (tmp_path / "full.tar").unlink()
    ds = build_dataset("wds", str(tmp_path), split="train", holdout=0, epochs=1, shuffle=False, resolution=16)
    with pytest.warns(UserWarning, match="00000.tar"):
        got = sorted(e["prompt"] or e["answer"] for e in ds)
    assert got == [f"a red square {k}" for k in range(n)], got
    assert ds.stats["truncated_shard"] == 1 and ds.stats["samples"] == n, ds.stats


def test_skip_warnings_stop_after_20_shards_and_say_so(tmp_path):
    for s in range(25):                  # each shard: one good sample, one with an empty caption
        write_tar(tmp_path / f"{s:05d}.tar", good_members([s]) + [(f"e{s}.jpg", encode(fmt="JPEG")), (f"e{s}.txt", b" ")])
    ds = build_dataset("wds", str(tmp_path), split="train", holdout=0, epochs=1, shuffle=False, resolution=16)
    with pytest.warns(UserWarning) as record:
        n = sum(1 for _ in ds)
    skips = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert n == 25 and ds.stats["empty_caption"] == 25
    assert len(skips) == 20 and "further skips are only counted" in skips[-1], skips[-2:]
    assert not any("further skips" in m for m in skips[:-1])
