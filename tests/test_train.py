"""train.py as a user runs it: tiny model, 32 px shapes, an untrained tiny VAE, a few steps each."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fast sampling and evaluation: what is tested is the plumbing, not the quality
FAST = ["--model", "tiny", "--batch_size", "16", "--warmup", "5", "--log_interval", "1", "--eval_interval", "1000",
        "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2"]
EVAL_KEYS = {"gen_accuracy", "gen/single_object", "gen/two_object", "gen/counting", "gen/colors", "gen/position",
             "gen/color_attr", "caption_accuracy", "vqa_accuracy", "edit_accuracy", "val_loss_image", "val_loss_text",
             "gen_heldout_pairs", "gen_seen_pairs", "caption_heldout_pairs"}   # held-out colour-shape compositions


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per process slow tiny ops ~10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    from vae import AutoencoderKL, VAEConfig, save_vae
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("vae") / "vae.pt")
    save_vae(AutoencoderKL(VAEConfig.preset("shapes", ch=8, norm_groups=4)), path)   # 32 px -> 8x8x4 latents
    return path


def run(out_dir, vae_path, *flags):
    return train.main([*FAST, "--vae", vae_path, "--out_dir", str(out_dir), *flags])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vae_path):
    out = tmp_path_factory.mktemp("run")
    result = run(out, vae_path, "--max_steps", "30", "--lr", "3e-3", "--sample_interval", "30")
    return out, result


def test_tiny_run_lowers_both_losses_and_writes_its_outputs(trained):
    out, result = trained
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = log[:3], log[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
    assert mean(last, "loss_image") < 0.8 * mean(first, "loss_image")
    assert mean(last, "loss_text") < 0.8 * mean(first, "loss_text")
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in log)
    assert os.path.exists(out / "samples" / "step_000030.png") and os.path.exists(out / "samples" / "step_000030.txt")
    assert "model:" in (out / "samples" / "step_000030.txt").read_text()
    assert set(json.loads((out / "eval.json").read_text())) == EVAL_KEYS == set(result)


def test_checkpoint_format_and_load_checkpoint(trained, tmp_path):
    out, _ = trained
    model, vae, tokenizer, ckpt = train.load_checkpoint(str(out))
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "tokenizer", "vae", "args", "rng", "bad_steps"}
    assert ckpt["step"] == 30 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert tokenizer.state_dict()["kind"] == "word" and model.cfg.vocab_size == tokenizer.vocab_size
    # the EMA weights are what load_checkpoint returns by default
    assert torch.equal(model.llm.embed_tokens.weight, ckpt["ema"]["llm.embed_tokens.weight"])
    texts = model.generate_text(torch.zeros(2, 3, 32, 32), ["", "what color is the circle"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="python train.py"):
        train.load_checkpoint(str(tmp_path))


def test_eval_only_writes_the_documented_keys(trained):
    out, _ = trained
    os.remove(out / "eval.json")
    train.main(["--eval_only", "--out_dir", str(out), "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2"])
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == EVAL_KEYS
    assert all(0 <= result[k] <= 1 for k in EVAL_KEYS if not k.startswith("val_"))
    assert result["val_loss_image"] > 0 and result["val_loss_text"] > 0


def test_resume_continues_exactly(tmp_path, vae_path):
    run(tmp_path / "a", vae_path, "--max_steps", "6")
    run(tmp_path / "b", vae_path, "--max_steps", "6", "--stop_at", "3")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    run(tmp_path / "b", vae_path, "--max_steps", "6", "--init_from", "resume")
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    keys = ("step", "loss", "loss_image", "loss_text", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len(b) == 6


def test_two_processes_match_one_on_the_same_global_batch(tmp_path, vae_path):
    """torchrun, 2 CPU processes with gloo: they train, and their first-step gradients (averaged by DDP)
    equal those of one process doing the same 2 micro-batches by gradient accumulation."""
    flags = [*FAST, "--vae", vae_path, "--batch_size", "8", "--grad_accum", "2", "--max_steps", "2"]
    run_one = train.main([*flags, "--out_dir", str(tmp_path / "one"), "--dump_grads", str(tmp_path / "g1.pt")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(ROOT, "train.py"), *flags, "--out_dir", str(tmp_path / "two"),
                           "--dump_grads", str(tmp_path / "g2.pt")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stdout
    two = read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2] and all(r["loss"] == r["loss"] for r in two)
    g1, g2 = torch.load(tmp_path / "g1.pt"), torch.load(tmp_path / "g2.pt")
    zero = lambda g, n: g.get(n, torch.zeros_like((g1 | g2)[n]))   # unused parameter: None vs zeros
    for n in g1.keys() | g2.keys():
        torch.testing.assert_close(zero(g2, n), zero(g1, n), rtol=1e-4, atol=1e-6, msg=n)
    assert abs(read_log(tmp_path / "one")[0]["loss"] - two[0]["loss"]) < 1e-5
    assert run_one is not None


def test_nan_loss_is_skipped_and_counted(tmp_path, vae_path):
    run(tmp_path, vae_path, "--max_steps", "5", "--debug_nan_steps", "2")
    log = read_log(tmp_path)
    assert [r["skipped"] for r in log] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in log[3:])                 # training went on, finite
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["bad_steps"] == 1


def test_nan_loss_in_a_row_stops_and_keeps_the_last_checkpoint(tmp_path, vae_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, vae_path, "--max_steps", "20", "--eval_interval", "2", "--debug_nan_steps", "3:20",
            "--max_bad_steps", "3")
    assert "NaN/inf for 3 steps in a row" in str(e.value.code) and "intact" in str(e.value.code)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, vae_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", *FAST, "--vae", vae_path, "--out_dir", str(tmp_path),
                             "--max_steps", "100000"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by SIGTERM" in stdout and "--init_from resume" in stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 2


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "cc3m", "--data_dir", "/nonexistent/cc3m"], ["/nonexistent/cc3m", "data/README.md"]),
    (["--image_weight", "1.5"], ["--image_weight", "between 0 and 1"]),
    (["--order", "diagonal"], ["--order", "invalid choice"]),
    (["--tasks", "t2i=0.5,paint=0.5"], ["--tasks", "t2i, caption, vqa, edit"]),
    (["--init_from", "resume", "--out_dir", "/nonexistent/run"], ["no checkpoint", "python train.py"]),
])
def test_bad_input_is_one_clear_sentence(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = (capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")).strip()
    assert e.value.code != 0 and "Traceback" not in message
    last = message.splitlines()[-1]
    assert all(w in last for w in words), message
