"""
Sample from a trained UniFluid: text-to-image, captioning, question answering and editing.

    python sample.py --prompt "a red circle above a blue square"              # -> out/shapes/sample.png
    python sample.py --prompt "a red circle" --prompt "two blue squares" --num_images 4   # a row per prompt
    python sample.py --prompts prompts.txt                                     # one prompt per line
    python sample.py --image scene.png                                         # prints a caption
    python sample.py --image scene.png --question "what color is the circle"   # prints the answer
    python sample.py --image scene.png --edit "make the circle green"          # -> out/shapes/edit.png
    python sample.py --prompt "a red circle" --reveal reveal.gif    # also the image after each reveal step
    python sample.py --bench                  # images/s and tokens/s, cache on and off, on this device
    python sample.py --bench --compare 16/10/ddim --compare 8/10/ddim   # settings side by side, where time goes
    python sample.py --bench --model base --num_images 1   # a preset, untrained: its speed without training it

Reads out_dir/ckpt.pt written by train.py (EMA weights unless --no-ema). An empty prompt draws an
unconditional sample; a prompt longer than the model's text length is truncated, with a warning.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
from PIL import Image, ImageDraw

from unifluid import PRESETS, Config, UniFluid, checkpoint_path, load_checkpoint
from data.plots import save_grid
from vae import AutoencoderKL, VAEConfig, from_pil, to_pil

REVEAL_CELL, REVEAL_BAND, REVEAL_GAP = 96, 14, 4   # --reveal: px of an image at least, of the step label, between frames


def positive(kind):
    def check(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return check


def setting(s):
    """'16/50/ddpm' -> (reveal steps, head steps, sampler)."""
    parts = s.split("/")
    if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts[:2]) or parts[2] not in ("ddpm", "ddim"):
        raise argparse.ArgumentTypeError(f"expected REVEAL/HEAD/SAMPLER such as 16/50/ddpm, got {s!r}")
    return int(parts[0]), int(parts[1]), parts[2]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out/shapes", help="folder (or .pt file) of the checkpoint train.py wrote")
    p.add_argument("--prompt", action="append", default=[], help="text-to-image prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--image", help="input image for captioning, --question or --edit (any image Pillow opens)")
    p.add_argument("--question", help="with --image: answer this question about it")
    p.add_argument("--edit", help="with --image: an editing instruction; writes the edited image")
    p.add_argument("--out", help="PNG to write (default: OUT_DIR/sample.png, or OUT_DIR/edit.png)")
    p.add_argument("--num_images", type=positive(int), help="images per prompt, drawn as a grid (default 1; --bench: 8)")
    p.add_argument("--reveal", metavar="PATH", help="also write the image after each reveal step, decoded from the "
                   "tokens drawn so far (masked slots grey): PATH.gif animates them, PATH.png lays them in a strip")
    # image tokens (MAR sampling)
    p.add_argument("--guidance", "--cfg", type=float, default=3.0,
                   help="classifier-free guidance scale (1 = off); --cfg, MAR's name, is the same flag")
    p.add_argument("--temperature", type=float, default=1.0, help="noise temperature of the diffusion head")
    p.add_argument("--num_iter", type=positive(int), default=12, help="reveal steps of random-order sampling")
    p.add_argument("--diffusion_steps", type=positive(int),
                   help="diffusion head steps per token (default: 10 with ddim, 20 with ddpm)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"],
                   help="diffusion head sampler: ancestral ddpm (MAR's) or deterministic ddim (temperature 1 only); "
                        "default: ddim for a v-prediction or flow head at temperature 1, else ddpm (docs/sampling.md)")
    # text tokens
    p.add_argument("--text_temperature", type=float, default=0.0, help="0 = greedy decoding")
    p.add_argument("--top_k", type=positive(int), help="sample among the k most likely tokens")
    p.add_argument("--max_new_tokens", type=positive(int), help="default: the model's text length (--bench: 64)")
    # run
    p.add_argument("--seed", type=int, default=0, help="same seed, same output")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto = bfloat16 autocast on CUDA, float32 elsewhere")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--no_cache", action="store_true", help="recompute the prefix every step (slow; for checking)")
    p.add_argument("--bench", action="store_true", help="print images/s and tokens/s with the cache on and off")
    p.add_argument("--model", choices=list(PRESETS), help="with --bench: time this preset with untrained weights "
                   "instead of OUT_DIR's checkpoint (the work does not depend on the weights)")
    p.add_argument("--compare", action="append", type=setting, default=[], metavar="REVEAL/HEAD/SAMPLER",
                   help="with --bench: also time this setting (e.g. 16/50/ddpm, repeatable) beside the flags' own, "
                        "with the share of the trunk and the diffusion head in each")
    args = p.parse_args(argv)
    if (args.question or args.edit is not None) and not args.image:
        p.error("--question and --edit need --image PATH")
    if args.question and args.edit is not None:
        p.error("give --question or --edit, not both")
    if args.image and (args.prompt or args.prompts):
        p.error("--prompt is for text-to-image; with --image use --question or --edit")
    if not (args.prompt or args.prompts or args.image or args.bench):
        p.error('say what to do: --prompt "a red circle", --prompts FILE, --image PATH or --bench')
    if args.reveal and (args.bench or args.image and args.edit is None):
        p.error("--reveal shows an image being drawn: use it with --prompt, --prompts or --edit")
    if args.reveal and not args.reveal.lower().endswith((".gif", ".png")):
        p.error(f"--reveal writes a .gif (one frame per step) or a .png (a strip), not {args.reveal!r}")
    if args.text_temperature < 0 or args.temperature < 0:
        p.error("temperatures must be >= 0")
    if args.temperature != 1.0 and "ddim" in [args.sampler] + [c[2] for c in args.compare]:
        p.error("--temperature scales the per-step noise of --sampler ddpm; ddim adds none: drop one of them")
    if (args.compare or args.model) and not args.bench:
        p.error(f"--{'compare' if args.compare else 'model'} is for timing: add --bench")
    return args


def fail(msg):
    sys.exit(f"error: {msg}")


def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def load(args):
    """-> (model, vae, device, autocast context), or one sentence on why not."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() or device == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device} is not available on this machine; use --device cpu")
    if args.model:                       # untrained: a preset and a VAE of its latent grid, both at random init
        cfg = Config.preset(args.model)
        levels = (cfg.image_size // cfg.latent_size).bit_length()      # each level after the first halves H, W
        vae = AutoencoderKL(VAEConfig.preset("shapes", ch_mult=(1, 2, 4, 4, 4)[:levels],
                                             latent_channels=cfg.latent_channels)).to(device)
        model = UniFluid(cfg).to(device)
    else:
        path = checkpoint_path(args.out_dir)
        if not os.path.isfile(path):
            fail(f"no checkpoint at {path}: train one with `python train.py --out_dir {os.path.dirname(path) or '.'}` "
                 f"or point --out_dir at the folder that holds ckpt.pt")
        try:                             # weights_only: a checkpoint from elsewhere cannot run code
            model, vae, _, _ = load_checkpoint(path, device, ema=args.ema)
        except Exception as e:
            fail(f"cannot load checkpoint {path}: {e}")
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device == "cuda" else "float32"
    if dtype == "bfloat16" and device != "cuda":   # bf16 on a CPU without bf16 units is far slower (docs/performance.md)
        warn(f"bfloat16 autocast is for CUDA; computing in float32 on {device}")
        dtype = "float32"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()
    return model.eval(), vae.eval(), device, amp


def read_prompts(args, model):
    prompts = list(args.prompt)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read prompts from {args.prompts}: {e}")
        if not prompts:
            fail(f"{args.prompts} holds no prompts (one per line)")
    if "" in prompts:
        warn("empty prompt: drawing an unconditional sample")
    return [check_prompt(model, p) for p in prompts]


def check_prompt(model, prompt):
    """Truncate to the model's text length, saying so."""
    tok, n = model.tokenizer, model.cfg.max_text_len
    ids = tok.encode(prompt)
    if len(ids) > n:
        prompt = tok.decode(ids[:n])
        warn(f"prompt is {len(ids)} tokens but the model reads at most {n}: truncated to {prompt!r}")
    return prompt


def read_image(path, size):
    """Any image Pillow opens -> (1, 3, size, size) in [-1, 1], converted and resized as in training."""
    from data.imagetext import to_rgb    # grey, palette, CMYK, 16-bit, alpha on white: as the data readers do
    try:
        with Image.open(path) as im:     # a header claiming > 2 x Image.MAX_IMAGE_PIXELS raises here, undecoded
            if im.format == "JPEG":
                im.draft("RGB", (size, size))   # a huge JPEG decodes at 1/2 .. 1/8 scale
            im.load()
            return from_pil(to_rgb(im), size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        fail(f"cannot read {path} as an image ({type(e).__name__}: {e})")


def default_out(args, name):
    return args.out or os.path.join(args.out_dir if not args.out_dir.endswith(".pt") else os.path.dirname(args.out_dir), name)


def save_png(images, rows, path):
    """images (rows * k, 3, H, W) in [-1, 1] -> one PNG, a row per prompt (written whole, or not at all)."""
    try:
        save_grid(images, path, cols=len(images) // rows)
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    print(path)


def text_to_image(model, vae, prompts, k, args, generator, und_images=None, on_step=None):
    """k images per prompt -> (len(prompts) * k, 3, H, W) in [-1, 1]."""
    batch = [p for p in prompts for _ in range(k)]
    und = und_images.expand(len(batch), -1, -1, -1) if und_images is not None else None
    latents = model.generate_images(batch, args.num_iter, args.guidance, args.temperature, args.diffusion_steps,
                                    und_images=und, generator=generator, use_cache=not args.no_cache,
                                    on_step=on_step, sampler=args.sampler)
    return vae.decode(latents.float())


def record_reveal(vae):
    """-> (frames, on_step): on_step decodes each reveal step's latents into frames (a (B, 3, H, W) batch
    each), the slots still masked painted grey. Decoding draws no random numbers, so the sample is unchanged."""
    frames = []

    def on_step(k, latents, mask):
        images = vae.decode(latents.float())
        g = math.isqrt(mask.shape[1])                      # slots per side, in raster order
        s = images.shape[-1] // g                          # pixels per slot
        hidden = mask.view(-1, 1, g, g).repeat_interleave(s, 2).repeat_interleave(s, 3)
        frames.append(images.masked_fill(hidden, 0.0))     # 0 = mid grey in [-1, 1]
    return frames, on_step


def save_reveal(frames, rows, path):
    """One frame per reveal step, each the sample's grid (a row per prompt) upscaled to REVEAL_CELL px an
    image, under its step number: a GIF, or a PNG strip of the frames left to right (written whole, or not at all)."""
    cols, H = len(frames[0]) // rows, frames[0].shape[-1]
    scale = -(-REVEAL_CELL // H)                           # a whole factor, so pixels stay sharp squares
    pics = []
    for k, images in enumerate(frames):
        grid = Image.new("RGB", (cols * H, rows * H))
        for i, im in enumerate(to_pil(images)):
            grid.paste(im, ((i % cols) * H, (i // cols) * H))
        pic = Image.new("RGB", (grid.width * scale, REVEAL_BAND + grid.height * scale), "white")
        pic.paste(grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST), (0, REVEAL_BAND))
        ImageDraw.Draw(pic).text((2, 1), f"step {k + 1}/{len(frames)}", fill="black")
        pics.append(pic)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if path.lower().endswith(".gif"):                  # the last frame stays up longer
            pics[0].save(tmp, format="GIF", save_all=True, append_images=pics[1:], loop=0,
                         duration=[400] * (len(pics) - 1) + [2000])
        else:
            w = pics[0].width + REVEAL_GAP
            strip = Image.new("RGB", (len(pics) * w - REVEAL_GAP, pics[0].height), "white")
            for k, pic in enumerate(pics):
                strip.paste(pic, (k * w, 0))
            strip.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        fail(f"cannot write {path}: {e}")
    print(path)


@contextlib.contextmanager
def no_early_stop(tokenizer):
    """Decode exactly max_new_tokens tokens (no id equals -1, so no row ever ends): a fixed work size."""
    tokenizer.eos_id = -1
    try:
        yield
    finally:
        del tokenizer.eos_id


def synchronizer(device):
    """-> a function that waits for the device's queued work (a GPU runs asynchronously), for timing."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def best_times(fns, device, repeats=3):
    """-> (outputs, best wall time of each fn). Runs round-robin, so a busy spell of a shared machine
    slows every path alike, and keeps each path's best (least disturbed) run."""
    sync = synchronizer(device)
    outs, best = [None] * len(fns), [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            outs[i] = fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return outs, best


def same(a, b):
    if isinstance(a, list):
        return "identical" if a == b else "DIFFERENT"
    d = (a - b).abs().max().item()
    return "identical" if d == 0 else f"max |diff| {d:.1e}"


@contextlib.contextmanager
def time_split(model, device):
    """-> dict of seconds spent, while it is open, in the trunk (the decoder's forward calls) and in the
    diffusion head's sampler (model.diffusion.sample: the head network and its per-step updates)."""
    sync = synchronizer(device)
    spent = {"trunk": 0.0, "head": 0.0}
    def timed(fn, name):
        def call(*a, **k):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            spent[name] += time.perf_counter() - t0
            return out
        return call
    model.llm.forward, model.diffusion.sample = timed(model.llm.forward, "trunk"), timed(model.diffusion.sample, "head")
    try:
        yield spent
    finally:
        del model.llm.forward, model.diffusion.sample     # back to the class's methods


def compare(model, prompts, args, device, seeded):
    """images/s of the flags' setting and each --compare setting, timed round-robin (best of 3), and the share
    of one call's wall time spent in the trunk, in the diffusion head's sampler, and elsewhere (embedding,
    masking, Python)."""
    settings = [(args.num_iter, *model.sampler_defaults(args.temperature, args.sampler, args.diffusion_steps)[::-1])]
    settings += args.compare
    run = lambda r, s, smp: model.generate_images(prompts, r, args.guidance, args.temperature, s, generator=seeded(),
                                                  sampler=smp)
    _, t = best_times([lambda st=st: run(*st) for st in settings], device)
    print(f"text-to-image, {len(prompts)} images, guidance {args.guidance}, prefix cache: reveal steps / head steps / sampler")
    rows = []
    for st, ti in zip(settings, t):
        with time_split(model, device) as spent:
            _, (wall,) = best_times([lambda: run(*st)], device, repeats=1)
        share = {k: v / wall for k, v in spent.items()}
        print(f"  {'/'.join(map(str, st)):14s} {len(prompts) / ti:8.2f} images/s  {t[0] / ti:5.2f}x the first   "
              f"trunk {share['trunk']:4.0%}  head {share['head']:4.0%}  other {1 - sum(share.values()):4.0%}")
        rows.append({"setting": "/".join(map(str, st)), "images_per_s": round(len(prompts) / ti, 3),
                     **{k: round(v, 3) for k, v in share.items()}})
    print(json.dumps({"result": "compare", "device": str(device), "threads": torch.get_num_threads(), "rows": rows}))


def bench(model, vae, args, device):
    """images/s and tokens/s of each sampling path, one seed for all (docs/performance.md: the
    prefix cache + batched CFG against the naive loop; KV-cached decoding against recomputation)."""
    B, new = args.num_images or 8, args.max_new_tokens or 64
    prompts = (args.prompt or ["a red circle above a blue square"])[:1] * B
    seeded = lambda: torch.Generator(device).manual_seed(args.seed)
    print(f"bench: {device}, {torch.get_num_threads()} threads, {model.num_params() / 1e6:.2f}M params, "
          f"d_model {model.cfg.d_model} x {model.cfg.n_layer} layers, {model.cfg.num_image_tokens} image tokens")
    sampler, steps = model.sampler_defaults(args.temperature, args.sampler, args.diffusion_steps)
    print(f"text-to-image, {B} images, {args.num_iter} reveal steps x {steps} {sampler} steps, guidance {args.guidance}:")
    paths = [("naive: no cache, cond and uncond as separate passes", dict(use_cache=False, batch_cfg=False)),
             ("no cache, cond and uncond in one batch", dict(use_cache=False)),
             ("prefix cache, cond and uncond in one batch", dict(use_cache=True))]
    outs, t_img = best_times([lambda kw=kw: model.generate_images(prompts, args.num_iter, args.guidance, args.temperature,
                              steps, generator=seeded(), sampler=sampler, **kw) for _, kw in paths], device)
    for i, ((name, _), out, t) in enumerate(zip(paths, outs, t_img)):   # each path against the last (cached) one
        check = f"outputs {same(out, outs[-1])}" if i < len(paths) - 1 else "(reference)"
        print(f"  {name:52s} {B / t:8.2f} images/s  {t_img[0] / t:5.2f}x naive   {check}")
    if args.compare:
        compare(model, prompts, args, device, seeded)
    images = vae.decode(outs[-1].float())                                           # caption what we drew
    print(f"captioning, {B} images, {new} new tokens each (end of text ignored: every row decodes {new}):")
    paths = [("no cache: recompute the whole sequence each token", False), ("kv cache", True)]
    with no_early_stop(model.tokenizer):
        texts, t_txt = best_times([lambda c=c: model.generate_text(images, [""] * B, new, generator=seeded(), use_cache=c)
                                   for _, c in paths], device)
    for i, ((name, _), out, t) in enumerate(zip(paths, texts, t_txt)):
        check = f"outputs {same(out, texts[-1])}" if i < len(paths) - 1 else "(reference)"
        print(f"  {name:52s} {B * new / t:8.1f} tokens/s  {t_txt[0] / t:5.2f}x naive   {check}")
    print(json.dumps({"result": "bench", "device": str(device), "threads": torch.get_num_threads(),
                      "t2i_images_per_s": dict(zip(["naive", "no_cache", "cached"], [round(B / t, 3) for t in t_img])),
                      "caption_tokens_per_s": dict(zip(["recompute", "cached"], [round(B * new / t, 1) for t in t_txt]))}))


def main(argv=None):
    args = parse_args(argv)
    model, vae, device, amp = load(args)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    size = model.cfg.image_size
    with torch.no_grad(), amp:
        if args.bench:
            return bench(model, vae, args, device)
        frames, on_step = record_reveal(vae) if args.reveal else (None, None)
        if not args.image:                                                         # text -> image
            prompts = read_prompts(args, model)
            images = text_to_image(model, vae, prompts, args.num_images or 1, args, generator, on_step=on_step)
            save_png(images, len(prompts), default_out(args, "sample.png"))
            return save_reveal(frames, len(prompts), args.reveal) if args.reveal else None
        image = read_image(args.image, size).to(device)
        if args.edit is not None:                                                  # image + instruction -> image
            images = text_to_image(model, vae, [check_prompt(model, args.edit)], args.num_images or 1, args,
                                   generator, und_images=image, on_step=on_step)
            save_png(images, 1, default_out(args, "edit.png"))
            return save_reveal(frames, 1, args.reveal) if args.reveal else None
        question = check_prompt(model, args.question or "")                        # '' = caption
        text = model.generate_text(image, [question], args.max_new_tokens or model.cfg.max_text_len,
                                   args.text_temperature, args.top_k, generator, use_cache=not args.no_cache)[0]
        print(text)


if __name__ == "__main__":
    main()
