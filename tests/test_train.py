"""train.py as a user runs it: tiny model, 32 px shapes, an untrained tiny VAE, a few steps each."""
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import unifluid
import train
from data import shapes as S
from data.streams import rows_per_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# fast sampling and evaluation: what is tested is the plumbing, not the quality
FAST = ["--model", "tiny", "--batch_size", "16", "--warmup", "5", "--log_interval", "1", "--eval_interval", "1000",
        "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2",
        "--vit_pretrain", "2", "--vit_pretrain_batch", "8"]   # the ViT pretraining runs too, for two steps
EVAL_KEYS = {"gen_accuracy", "gen/single_object", "gen/two_object", "gen/counting", "gen/colors", "gen/position",
             "gen/color_attr", "caption_accuracy", "vqa_accuracy", "edit_accuracy", "val_loss_image", "val_loss_text",
             "gen_heldout_pairs", "gen_seen_pairs", "caption_heldout_pairs"}   # held-out colour-shape compositions


def without_vqa_kinds(result):
    """The evaluation's fixed keys: VQA accuracy per question kind (vqa/<kind>) is there for the kinds asked."""
    assert {k[4:] for k in result if k.startswith("vqa/")} <= set(S.VQA_KINDS)
    return {k: v for k, v in result.items() if not k.startswith("vqa/")}


def run(out_dir, vae_path, *flags):
    return train.main([*FAST, "--vae", vae_path, "--out_dir", str(out_dir), *flags])


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vae_path):
    out = tmp_path_factory.mktemp("run")
    result = run(out, vae_path, "--max_steps", "30", "--lr", "3e-3", "--sample_interval", "30", "--accuracy_interval", "20")
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
    assert not any("graphs" in r for r in log)                          # --compile auto: off on CPU
    assert os.path.exists(out / "samples" / "step_000030.png") and os.path.exists(out / "samples" / "step_000030.txt")
    assert "model:" in (out / "samples" / "step_000030.txt").read_text()
    assert set(json.loads((out / "eval.json").read_text())) == set(result)
    assert set(without_vqa_kinds(result)) == EVAL_KEYS
    # --accuracy_interval 20: the evaluation along the way (a curve) and at the end
    assert sorted(p.name for p in out.glob("eval_step*.json")) == ["eval_step20.json", "eval_step30.json"]
    assert json.loads((out / "eval_step30.json").read_text()) == result


def test_checkpoint_format_and_load_checkpoint(trained, tmp_path):
    out, _ = trained
    model, vae, tokenizer, ckpt = unifluid.load_checkpoint(str(out))
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "tokenizer", "vae", "args", "rng", "bad_steps"}
    assert ckpt["step"] == 30 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert tokenizer.state_dict()["kind"] == "word" and model.cfg.vocab_size == tokenizer.vocab_size
    # the EMA weights are what load_checkpoint returns by default, the raw ones with ema=False; after 30
    # steps they differ in every trained matrix, so a checkpoint that saved one as the other fails here
    raw, ema = ckpt["model"], ckpt["ema"]
    assert raw.keys() == ema.keys()
    assert_same(model.state_dict(), ema, "ema")
    assert_same(unifluid.load_checkpoint(str(out), ema=False)[0].state_dict(), raw, "model")
    differ = [k for k in raw if raw[k].dim() == 2 and not torch.equal(raw[k], ema[k])]
    assert len(differ) >= 0.9 * sum(v.dim() == 2 for v in raw.values()), differ
    texts = model.generate_text(torch.zeros(2, 3, 32, 32), ["", "what color is the circle"], max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="python train.py"):
        unifluid.load_checkpoint(str(tmp_path))


def test_eval_only_writes_the_documented_keys(trained, tmp_path):
    out = tmp_path                       # a copy of the run: its own eval.json stays as the run wrote it
    shutil.copy(trained[0] / "ckpt.pt", out / "ckpt.pt")
    train.main(["--eval_only", "--out_dir", str(out), "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2",
                "--sampler", "ddim"])      # the run itself evaluated with the default sampler
    result = json.loads((out / "eval.json").read_text())
    assert set(without_vqa_kinds(result)) == EVAL_KEYS
    assert all(0 <= v <= 1 for k, v in result.items() if not k.startswith("val_"))
    assert result["val_loss_image"] > 0 and result["val_loss_text"] > 0


def test_resume_continues_exactly(tmp_path, vae_path):
    """Also: examples drawn in this process (a, --workers 0) and in a worker process (b) are the same."""
    run(tmp_path / "a", vae_path, "--max_steps", "6", "--workers", "0")
    run(tmp_path / "b", vae_path, "--max_steps", "6", "--stop_at", "3")
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 3
    run(tmp_path / "b", vae_path, "--max_steps", "6", "--init_from", "resume")
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    keys = ("step", "loss", "loss_image", "loss_text", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    assert len(b) == 6
    # the final weights, EMA and AdamW state (moments, step counts) of both runs are the same tensors
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema", "optimizer"):
        assert_same(a[part], b[part], part)
    assert not torch.equal(a["ema"]["llm.embed_tokens.weight"], a["model"]["llm.embed_tokens.weight"])


def test_vit_lr_scale_moves_the_vit_at_that_fraction_and_resumes_exactly(tmp_path, vae_path, monkeypatch, capsys):
    """--vit_lr_scale 0.1: AdamW's first step moves each weight by about its group's lr (m / sqrt(v) = +-1), so the
    ViT's weights move a tenth as far as the rest; a run stopped and resumed ends on the same tensors; resuming
    with another scale (another layout of AdamW's groups) is refused in one sentence."""
    real, first = train.train_step, []

    def spy(run, step, **kw):
        if step > 0:
            return real(run, step, **kw)
        before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
        out = real(run, step, **kw)
        first.append({k: (v - before[k]).abs().max().item() for k, v in run.raw_model.state_dict().items()})
        return out
    monkeypatch.setattr(train, "train_step", spy)
    run(tmp_path / "a", vae_path, "--max_steps", "4", "--vit_lr_scale", "0.1", "--lr", "2e-3")
    moved = first[0]
    vit = max(v for k, v in moved.items() if k.startswith("vision."))
    rest = max(v for k, v in moved.items() if not k.startswith("vision."))
    assert rest == pytest.approx(2e-3 / 5, rel=0.05)                  # --lr 2e-3 at the first of 5 warmup steps
    assert vit == pytest.approx(0.1 * rest, rel=0.05)
    run(tmp_path / "b", vae_path, "--max_steps", "4", "--vit_lr_scale", "0.1", "--lr", "2e-3", "--stop_at", "2")
    run(tmp_path / "b", vae_path, "--max_steps", "4", "--init_from", "resume")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    for part in ("model", "ema", "optimizer"):
        assert_same(a[part], b[part], part)
    assert [g["lr_scale"] for g in b["optimizer"]["param_groups"]] == [1.0, 1.0, 0.1, 0.1]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(tmp_path / "b", vae_path, "--max_steps", "6", "--init_from", "resume", "--vit_lr_scale", "1")
    assert "--vit_lr_scale 0.1, not 1.0; drop --vit_lr_scale to continue it" in str(e.value.code)
    # a checkpoint from before --vit_lr_scale (no such flag saved, the ViT in the common groups) resumes as it was
    run(tmp_path / "c", vae_path, "--max_steps", "4", "--vit_lr_scale", "1", "--stop_at", "2")
    ckpt = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    del ckpt["args"]["vit_lr_scale"]
    torch.save(ckpt, tmp_path / "c" / "ckpt.pt")
    run(tmp_path / "c", vae_path, "--max_steps", "4", "--init_from", "resume")
    groups = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0]


def test_a_data_worker_left_running_does_not_keep_python_from_exiting():
    """A feed nobody closes (train.main called from a script that exits without returning, say): Python still
    exits, and the worker with it, although the worker ignores the SIGTERM that Python's exit sends it."""
    code = ("import train; from data.streams import step_examples, rows_per_task; "
            "args = train.get_args(['--model', 'tiny', '--batch_size', '8', '--resolution', '32']); args.grad_accum = 1; "
            "feed = step_examples(args, [0], 0, rows_per_task(train.task_mix(args), 8)); "
            "examples, skipped = next(feed); print('drawn', len(examples[0]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "drawn 8" in out.stdout, out.stderr


def assert_same(a, b, where):
    """Nested dicts / lists of tensors and numbers: equal exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    else:
        assert a == b, where


def snapshot(run):
    """Copies of the raw weights, the EMA and the AdamW state (moments, step counts; the lr is set anew
    every step) of a run (train.py's build_run namespace)."""
    clone = lambda x: {k: clone(v) for k, v in x.items()} if isinstance(x, dict) else \
        [clone(v) for v in x] if isinstance(x, list) else x.clone() if isinstance(x, torch.Tensor) else x
    return clone(dict(model=run.raw_model.state_dict(), ema=run.ema_model.state_dict(),
                      optimizer=run.optimizer.state_dict()["state"]))


def test_rows_per_task_by_largest_remainder():
    mix = train.task_mix(train.get_args([]))                            # the default t2i 0.6, caption 0.2, vqa 0.2
    assert rows_per_task(mix, 64) == {"t2i": 38, "caption": 13, "vqa": 13}
    assert rows_per_task(mix, 16) == {"t2i": 10, "caption": 3, "vqa": 3}
    assert rows_per_task({"t2i": 0.97, "caption": 0.01, "vqa": 0.01, "edit": 0.01}, 8) == \
        {"t2i": 5, "caption": 1, "vqa": 1, "edit": 1}                 # at least one row per task


def test_non_finite_steps_leave_weights_ema_and_optimizer_untouched(tmp_path, vae_path, diverge_at, monkeypatch,
                                                                    capsys):
    """Step 1 has a NaN loss and gradients, step 2 inf ones, step 3 a finite loss with NaN gradients:
    none of them moves a weight, the EMA or AdamW's state; step 0 and step 4 do."""
    diverge_at({1: "nan", 2: "inf", 3: "grad_nan"})
    real, seen = train.train_step, {}

    def spy(run, step, **kw):
        before = snapshot(run)
        out = real(run, step, **kw)
        seen[step] = before, snapshot(run), out
        return out
    monkeypatch.setattr(train, "train_step", spy)
    run(tmp_path, vae_path, "--max_steps", "10", "--stop_at", "5")
    assert [seen[s][2]["applied"] for s in range(5)] == [True, False, False, False, True]
    assert seen[3][2]["loss"] == seen[3][2]["loss"] and seen[2][2]["loss"] == float("inf")
    for step in (1, 2, 3):
        before, after, _ = seen[step]
        assert_same(after, before, f"step {step}")
    for step in (0, 4):
        before, after, _ = seen[step]
        for part in ("model", "ema"):
            assert not torch.equal(after[part]["llm.embed_tokens.weight"], before[part]["llm.embed_tokens.weight"])
            assert all(v.isfinite().all() for v in after[part].values())
    assert [r["skipped"] for r in read_log(tmp_path)] == [0, 1, 2, 3, 3]
    stdout = capsys.readouterr().out                                    # the rows of the 16-row micro-batch
    assert "data: shapes 32px, rows per micro-batch t2i 10, caption 3, vqa 3;" in stdout
    assert "compiling" not in stdout                                    # --compile auto: off on CPU


def test_fine_tune_from_a_checkpoint_file_in_raster_order(trained, tmp_path, vae_path, monkeypatch):
    """--init_from PATH.pt starts a new run (step 0, fresh AdamW) from the file's EMA weights; --order
    raster given again trains it in raster order, and its checkpoint says so."""
    src = trained[0] / "ckpt.pt"
    real, first = train.train_step, []

    def spy(run, step, **kw):
        if not first:
            first.append(snapshot(run))
        return real(run, step, **kw)
    monkeypatch.setattr(train, "train_step", spy)
    run(tmp_path, vae_path, "--init_from", str(src), "--order", "raster", "--max_steps", "10", "--stop_at", "2")
    start, source = first[0], torch.load(src, weights_only=True)
    assert_same(start["model"], source["ema"], "model")
    assert start["optimizer"] == {}
    assert_same(start["ema"], source["ema"], "ema")
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["order"] == "raster" and source["config"]["order"] == "random"


DUMP_FIRST_GRADIENTS = """
import os, sys, torch, train
real, path = train.accumulate_gradients, sys.argv[1]

def dump(run, step):        # train.py with a spy: the first step's gradients (averaged, gathered) to a file
    stats = real(run, step)
    if step == 0:           # under FSDP gathering is a collective: every rank gathers, rank 0 saves
        grads = {n: train.full_tensor(p.grad).detach().cpu().clone() for n, p in run.raw_model.named_parameters()
                 if p.grad is not None}
        if int(os.environ.get("RANK", 0)) == 0:
            torch.save(grads, path)
    return stats
train.accumulate_gradients = dump
train.main(sys.argv[2:])
"""


def dump_script(tmp_path):
    """`python SCRIPT GRADS.pt FLAGS...` runs train.py and saves its first step's gradients to GRADS.pt."""
    script = tmp_path / "dump_first_gradients.py"
    script.write_text(DUMP_FIRST_GRADIENTS)
    return str(script)


def test_two_processes_match_one_on_the_same_global_batch(tmp_path, vae_path):
    """torchrun, 2 CPU processes with gloo: they train, and their first-step gradients (averaged by DDP)
    equal those of one process doing the same 2 micro-batches by gradient accumulation."""
    flags = [*FAST, "--vae", vae_path, "--batch_size", "8", "--grad_accum", "2", "--max_steps", "2"]
    script = dump_script(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = subprocess.run([sys.executable, script, str(tmp_path / "g1.pt"), *flags, "--out_dir",
                          str(tmp_path / "one")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, str(tmp_path / "g2.pt"), *flags, "--out_dir", str(tmp_path / "two")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over 2 process(es)" in proc.stdout
    two = read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2] and all(r["loss"] == r["loss"] for r in two)
    g1, g2 = (torch.load(tmp_path / f, weights_only=True) for f in ("g1.pt", "g2.pt"))
    zero = lambda g, n: g.get(n, torch.zeros_like((g1 | g2)[n]))   # unused parameter: None vs zeros
    for n in g1.keys() | g2.keys():
        torch.testing.assert_close(zero(g2, n), zero(g1, n), rtol=1e-4, atol=1e-6, msg=n)
    assert abs(read_log(tmp_path / "one")[0]["loss"] - two[0]["loss"]) < 1e-5


def test_nan_loss_is_skipped_and_counted(tmp_path, vae_path, diverge_at):
    diverge_at(range(2, 3))
    run(tmp_path, vae_path, "--max_steps", "5")
    log = read_log(tmp_path)
    assert [r["skipped"] for r in log] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] for r in log[3:])                 # training went on, finite
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["bad_steps"] == 1


def test_nan_loss_in_a_row_stops_and_keeps_the_last_checkpoint(tmp_path, vae_path, capsys, diverge_at):
    diverge_at(range(3, 20), max_bad=3)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, vae_path, "--max_steps", "20", "--eval_interval", "2")
    assert "NaN/inf for 3 steps in a row" in str(e.value.code) and "intact" in str(e.value.code)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, vae_path, child):
    """SIGINT (Ctrl-C) once the handler is installed and two steps are done: the step finishes, a
    checkpoint is saved, exit 0 (tests/test_reliability.py sends SIGTERM). Sent to the process group, as a
    terminal does, so the data worker gets it too and must leave the stop to train.py."""
    proc = child([sys.executable, "train.py", *FAST, "--vae", vae_path, "--out_dir", str(tmp_path),
                  "--max_steps", "100000"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                 start_new_session=True)
    proc.wait_for(r"^Ctrl-C or SIGTERM: ", 120)
    proc.wait_for(r"^step 2/100000 \|", 120)
    os.killpg(proc.proc.pid, signal.SIGINT)
    code, stdout, stderr = proc.finish(120)
    assert code == 0, stderr[-2000:]
    assert "stopped by SIGINT" in stdout and "--init_from resume" in stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] >= 2


def test_a_second_signal_gives_up_at_once():
    """The first SIGINT/SIGTERM asks for a stop after the step; a second raises KeyboardInterrupt there and
    then; leaving the block puts the caller's handlers back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with train.stop_signals() as stop:
        handler = signal.getsignal(signal.SIGINT)
        assert handler is signal.getsignal(signal.SIGTERM) and handler not in before
        handler(signal.SIGTERM, None)
        assert stop["signal"] == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGINT, None)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "cc3m", "--data_dir", "/nonexistent/cc3m"], ["/nonexistent/cc3m", "data/README.md"]),
    (["--image_weight", "1.5"], ["--image_weight", "between 0 and 1"]),
    (["--order", "diagonal"], ["--order", "invalid choice"]),
    (["--tasks", "t2i=0.5,paint=0.5"], ["--tasks", "t2i, caption, vqa, edit"]),
    (["--init_from", "resume", "--out_dir", "/nonexistent/run"], ["no checkpoint", "python train.py"]),
    (["--fsdp"], ["--fsdp", "torchrun --nproc_per_node N"]),
    (["--sampler", "ddim", "--temperature", "0.5"], ["--temperature", "ddim adds none"]),
])
def test_bad_input_is_one_clear_sentence(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = (capsys.readouterr().err + (e.value.code if isinstance(e.value.code, str) else "")).strip()
    assert e.value.code != 0 and "Traceback" not in message
    last = message.splitlines()[-1]
    assert all(w in last for w in words), message


def test_guidance_flag_keeps_mars_name_cfg():
    import sample
    for parse, more in ((train.get_args, []), (sample.parse_args, ["--prompt", "a red circle"])):
        assert parse(["--cfg", "2.5", *more]).guidance == 2.5 == parse(["--guidance", "2.5", *more]).guidance


def torchrun(nproc, *argv, script=os.path.join(ROOT, "train.py")):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), script, *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_fsdp_matches_one_process_saves_full_checkpoints_and_resumes(tmp_path, vae_path):
    """torchrun --fsdp (FSDP2 over gloo, with activation checkpointing): the gathered first-step gradients
    and every step's loss equal one process's on the same global batch; the checkpoint is a full, plain
    state dict that load_checkpoint reads; a sharded run resumes from it exactly."""
    flags = [*FAST, "--vae", vae_path, "--batch_size", "8", "--grad_accum", "2", "--max_steps", "3"]
    script = dump_script(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    one = subprocess.run([sys.executable, script, str(tmp_path / "g1.pt"), *flags, "--out_dir", str(tmp_path / "one")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    sharded = [*flags, "--out_dir", str(tmp_path / "two"), "--fsdp", "--grad_checkpoint"]
    torchrun(2, str(tmp_path / "g2.pt"), *sharded, "--stop_at", "2", script=script)
    ckpt = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(type(v) is torch.Tensor for v in [*ckpt["model"].values(), *ckpt["ema"].values()])
    plain = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    assert ckpt["model"].keys() == plain["model"].keys()
    assert ckpt["optimizer"]["param_groups"][0]["params"] == plain["optimizer"]["param_groups"][0]["params"]
    torchrun(2, *sharded, "--init_from", "resume")
    g1, g2 = (torch.load(tmp_path / f, weights_only=True) for f in ("g1.pt", "g2.pt"))
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)
    keys = ("step", "loss", "loss_image", "loss_text", "lr")
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5)
    model, _, _, _ = unifluid.load_checkpoint(str(tmp_path / "two"))       # sample.py's loader, no process group
    assert model.generate_text(torch.zeros(1, 3, 32, 32), [""], max_new_tokens=2)


def write_wds(path, n, resolution=32, seed=0):
    """One WebDataset shard of n shapes scenes (PNG + caption), like img2dataset writes."""
    import io
    import tarfile
    import numpy as np
    from data import shapes
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            rng = np.random.default_rng([seed, i])
            scene = shapes.random_scene(rng, "train", resolution)
            buf = io.BytesIO()
            shapes.render(scene, resolution).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", shapes.caption(scene).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_pre_encoded_latents_equal_the_vae_and_train_alike(tmp_path, vae_path):
    """python vae.py --encode writes each image's latent, image and caption once; --dataset latents then
    trains exactly as the images would (the same first-step loss), without running the VAE encoder."""
    import vae as vae_lib
    from data import build_dataset
    from data.latents import LatentDataset
    (tmp_path / "wds").mkdir()
    write_wds(tmp_path / "wds" / "00000.tar", 40)
    wds, lat = str(tmp_path / "wds"), str(tmp_path / "lat")
    encode = ["--encode", "--vae", vae_path, "--dataset", "wds", "--data_dir", wds, "--resolution", "32"]
    assert vae_lib.main([*encode, "--out_dir", lat, "--latent_dtype", "float32"]) == 40
    shard = torch.load(os.path.join(lat, "train-00000.pt"), weights_only=True)
    source = list(build_dataset("wds", data_dir=wds, resolution=32, tasks={"t2i": 1.0}, shuffle=False, epochs=1,
                                holdout=0))     # all 40: the held-out part is encoded too (the reader drops it)
    images = torch.stack([e["output_image"] for e in source])
    vae = vae_lib.load_vae(vae_path)
    torch.testing.assert_close(shard["latents"], vae.encode(images), rtol=1e-5, atol=1e-5)
    std = torch.exp(0.5 * vae.posterior(images)[1]) * vae.scale_factor     # training draws from the posterior
    torch.testing.assert_close(shard["latent_std"], std, rtol=1e-5, atol=1e-6)
    assert torch.equal(shard["images"].float() / 127.5 - 1, images)
    assert shard["captions"] == [e["prompt"] for e in source]
    assert vae_lib.main([*encode, "--out_dir", str(tmp_path / "lat16")]) == 40     # the default: float16
    half = torch.load(tmp_path / "lat16" / "train-00000.pt", weights_only=True)["latents"]
    assert half.dtype == torch.float16 and torch.allclose(half.float(), shard["latents"], atol=2e-3)
    # examples: the same keys for every task (default collate), a latent instead of the VAE
    batch = torch.utils.data.default_collate(list(itertools.islice(iter(LatentDataset(lat)), 16)))
    assert set(batch) == {"task", "input_image", "output_image", "output_latent", "output_latent_std", "prompt",
                          "answer"}
    assert batch["output_latent"].shape == (16, 4, 8, 8)
    # one training step each way (the latents run finds its VAE and resolution in meta.json)
    flags = [*FAST, "--max_steps", "1", "--t2i", "0.5", "--caption", "0.5", "--eval_interval", "1000"]
    train.main([*flags, "--dataset", "wds", "--data_dir", wds, "--vae", vae_path, "--resolution", "32",
                "--out_dir", str(tmp_path / "from_images")])
    train.main([*flags, "--dataset", "latents", "--data_dir", lat, "--out_dir", str(tmp_path / "from_latents")])
    a, b = read_log(tmp_path / "from_images")[0], read_log(tmp_path / "from_latents")[0]
    for k in ("loss", "loss_image", "loss_text"):
        assert abs(a[k] - b[k]) < 1e-5 * abs(a[k]), (k, a[k], b[k])
    with pytest.raises(SystemExit, match="vae.py --encode"):
        train.main([*flags, "--dataset", "latents", "--data_dir", wds, "--out_dir", str(tmp_path / "none")])


def test_vit_pretraining_matches_images_to_captions_and_keeps_only_the_vit():
    """--vit_pretrain, the SigLIP-style pretraining before a fresh run: the sigmoid loss falls, images find their
    own caption above chance, the ViT's weights move and nothing else of the model does (the text tower is dropped)."""
    from contextlib import nullcontext
    args = train.get_args(["--model", "tiny", "--vit_pretrain", "120", "--vit_pretrain_batch", "32", "--resolution", "32"])
    tok = train.build_tokenizer(args, None)
    torch.manual_seed(0)
    model = unifluid.UniFluid(unifluid.Config.preset("tiny", vocab_size=tok.vocab_size), tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train.pretrain_vision(model, args, torch.device("cpu"), nullcontext(), lambda *a: None)
    after = model.state_dict()
    assert set(after) == set(before)
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and all(k.startswith("vision.") for k in moved)
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert stats["retrieval"] > 8 / 32           # chance is 1/32 (less where two captions are the same)


@pytest.mark.parametrize("flags, pretrains", [((), True), (("--image_weight", "1"), False),
                                              (("--tasks", "t2i=1"), False), (("--vit_pretrain", "0"), False)])
def test_vit_pretraining_runs_only_where_the_text_loss_trains_the_vit(tmp_path, vae_path, capsys, flags, pretrains):
    run(tmp_path, vae_path, "--max_steps", "1", *flags)
    assert ("SigLIP-style pretraining, 2 steps" in capsys.readouterr().out) == pretrains
