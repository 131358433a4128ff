"""Pictures, drawn with Pillow only (no matplotlib): save_grid, the one writer of image grids (training
samples, sample.py, VAE reconstructions), and the pictures of docs/ (README.md, docs/results.md), each with
its table on stdout.

    python data/plots.py sweep [out/sweep]    # the --image_weight trade-off (paper Fig. 3) -> docs/tradeoff.png
    python data/plots.py curve [out/curve [S]]   # accuracy against training compute -> docs/curve.png
    python data/plots.py order [out/order]    # random against raster order at several budgets -> docs/order.png
    python data/plots.py layout [out/layout]  # Gemma-1 against Gemma-2/3 decoder layout -> docs/layout.png
    python data/plots.py edits [out/edit [N]]    # N held-out edits of a checkpoint, oracle-scored -> docs/edits.png
    python data/plots.py masks                # the attention masks of the three layouts -> docs/masks.png

sweep: one run per weight (and seed) in SWEEP/w<weight>[_s<seed>]/eval.json (the loop in docs/results.md, "The trade-off");
the picture draws each weight's mean over its seeds.
order: one run per order, budget and seed in ORDER/<random|raster>_<steps>_s<seed>/eval.json (the loop in docs/results.md,
"Random against raster order"); the picture draws each order's mean over seeds against the training steps.
layout: runs in LAYOUT/<gemma1|gemma2>_s<seed>/ (eval.json and log.jsonl); the picture draws each run's validation
text loss along training.
edits: the checkpoint in RUN/ckpt.pt (EMA weights, sampling defaults) edits the first N (16) held-out scenes that
evaluation uses (seed 0); each row is the input with its instruction, the edit, and the target scene.
masks: no run needed; one short batch of the three layouts (4 und slots, 4 gen slots, word tokens), left-padded
as in training, its masks from unifluid.attention_mask in random and in raster order.
curve: the eval_step*.json that `train.py --accuracy_interval N` writes along one run; x is minutes of
training at S seconds per step (e.g. CPU seconds per step measured with /usr/bin/time), by default the
step time in the run's log.jsonl.
"""
import glob
import json
import math
import os
import re
import sys
import textwrap

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
LINES = [("gen_accuracy", "generation (GenEval-style)", (200, 40, 40)),
         ("gen/single_object", "gen: single_object", (230, 140, 40)),
         ("caption_accuracy", "caption accuracy", (40, 90, 200)),
         ("vqa_accuracy", "VQA accuracy", (30, 150, 60))]


def save_grid(images, path, cols, labels=None, cell=None):
    """The one picture writer: images (B, 3, H, W) in [-1, 1] -> one PNG, `cols` to a row. With labels,
    each image is upscaled to `cell` px with its text under it. Written to a temporary file and renamed,
    so a reader (or a second writer) never sees half a picture. OSError if it cannot be written."""
    from PIL import ImageFont
    from vae import to_pil
    ims = to_pil(images)
    cell, text_h = cell or ims[0].width, 4 * 11 + 4 if labels is not None else 0   # 4 lines of 11 px
    rows = math.ceil(len(ims) / cols)
    canvas = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, im in enumerate(ims):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        canvas.paste(im if im.width == cell else im.resize((cell, cell), Image.NEAREST), (x, y))
        if labels is not None:
            lines = textwrap.wrap(labels[i] or "(empty prompt)", width=cell // 6)[:4]
            draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)


def find_runs(root, pattern):
    """[(match, folder)] for each ROOT/<folder>/eval.json whose folder name matches `pattern` in full."""
    found = []
    for p in glob.glob(os.path.join(root, "*", "eval.json")):
        m = re.fullmatch(pattern, os.path.basename(os.path.dirname(p)))
        if m:
            found.append((m, os.path.dirname(p)))
    return found


def read_eval(folder):
    with open(os.path.join(folder, "eval.json")) as f:
        return json.load(f)


def table(rows, first, seeds=None):
    """rows: [(x, eval dict)] -> a markdown table, x in the first column (and each row's seed, if given)."""
    seed_head, seed_col = ("seed | ", lambda i: f"{seeds[i]} | ") if seeds else ("", lambda i: "")
    print(f"| {first} | {seed_head}gen_accuracy | caption_accuracy | vqa_accuracy | "
          + " | ".join(f"gen/{t}" for t in TASKS) + " | val_loss_image | val_loss_text |")
    print("|---" * (4 + bool(seeds) + len(TASKS) + 2) + "|")
    for i, (x, r) in enumerate(rows):
        print(f"| {x if isinstance(x, str) else format(x, 'g')} | {seed_col(i)}{r['gen_accuracy']:.3f} | {r['caption_accuracy']:.3f} | {r['vqa_accuracy']:.3f} | "
              + " | ".join(f"{r['gen/' + t]:.2f}" for t in TASKS)
              + f" | {r['val_loss_image']:.4f} | {r['val_loss_text']:.4f} |")


def plot(rows, keys, xmax, xlabel, ticks, path, ymax=1.0):
    """Accuracy (0..ymax) against x for each key of each row (a row lacking the key, or above ymax, is
    left off that line); ticks: [(x, label)] under the axis."""
    W, H, L, B, T, R = 640, 400, 60, 50, 20, 190          # size and margins (left, bottom, top, right)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    px = lambda x: L + x / xmax * (W - L - R)
    py = lambda a: H - B - a / ymax * (H - B - T)
    d.rectangle([L, T, W - R, H - B], outline="black")
    for a in (0, ymax / 4, ymax / 2, 3 * ymax / 4, ymax):
        d.line([L - 4, py(a), L, py(a)], fill="black")
        d.text((L - 34, py(a) - 6), f"{a:.2f}", fill="black")
    for x, label in ticks:
        d.line([px(x), H - B, px(x), H - B + 4], fill="black")
        d.text((px(x) - 8, H - B + 6), label, fill="black")
    d.text((L + 60, H - 22), xlabel, fill="black")
    for i, (k, label, color) in enumerate(keys):
        pts = [(px(x), py(r[k])) for x, r in rows if k in r and r[k] <= ymax]
        d.line(pts, fill=color, width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        d.text((W - R + 10, T + 20 + 18 * i), label, fill=color)
    img.save(path)
    print(f"wrote {path}", file=sys.stderr)


def sweep(root="out/sweep"):
    """One run per weight and seed: SWEEP/w<weight>/ or SWEEP/w<weight>_s<seed>/, each with an eval.json.
    The table lists every run; the picture draws the mean over seeds of each weight."""
    runs = [(float(m.group(1)), int(m.group(2) or 0), read_eval(d))
            for m, d in find_runs(root, r"w([\d.]+)(?:_s(\d+))?")]
    if not runs:
        raise SystemExit(f"no {root}/w*/eval.json: run the sweep in docs/results.md first")
    runs.sort(key=lambda r: r[:2])
    table([(w, r) for w, _, r in runs], "image_weight", seeds=[s for _, s, _ in runs])
    by_weight = {}
    for w, _, r in runs:
        by_weight.setdefault(w, []).append(r)
    weights = sorted(by_weight)
    mean = [(w, {k: sum(r[k] for r in by_weight[w]) / len(by_weight[w]) for k, _, _ in LINES}) for w in weights]
    ticks = [(w, f"{w:g}") for w in weights     # label the ticks that do not overlap
             if w == 1 or all(abs(w - v) > 0.05 for v in weights if v > w)]
    plot(mean, [LINES[0], LINES[2], LINES[3]], 1.0, "image_weight w  (0 = understanding only, 1 = generation only)",
         ticks, os.path.join(ROOT, "docs", "tradeoff.png"))


def order(root="out/order"):
    """Random against raster order: the table lists every run, the picture each order's mean over seeds."""
    runs = [(m.group(1), int(m.group(2)), int(m.group(3)), read_eval(d))
            for m, d in find_runs(root, r"(random|raster)_(\d+)_s(\d+)")]
    if not runs:
        raise SystemExit(f"no {root}/<random|raster>_<steps>_s<seed>/eval.json: run the loop in docs/results.md first")
    runs.sort(key=lambda r: r[:3])
    table([(f"{o} {n}", r) for o, n, _, r in runs], "order, steps", seeds=[s for _, _, s, _ in runs])
    groups = {}
    for o, n, _, r in runs:
        groups.setdefault(n, {}).setdefault(o, []).append(r)
    keys = [("random gen_accuracy", "random: generation", (200, 40, 40)),
            ("raster gen_accuracy", "raster: generation", (40, 90, 200)),
            ("random gen/position", "random: position", (230, 140, 40)),        # the paper: random order
            ("raster gen/position", "raster: position", (90, 170, 230))]        # helps most on position
    rows = []                  # budgets that have both orders, each order's mean over its seeds
    for n in sorted(groups):
        if len(groups[n]) == 2:
            rows.append((n, {f"{o} {k}": sum(r[k] for r in rs) / len(rs)
                             for o, rs in groups[n].items() for k in ("gen_accuracy", "gen/position")}))
    if not rows:
        raise SystemExit(f"no budget in {root} has runs of both orders yet")
    plot(rows, keys, rows[-1][0] * 1.08, "training steps (d 96 default, batch 64)",
         [(n, f"{n}") for n, _ in rows], os.path.join(ROOT, "docs", "order.png"))


def layout(root="out/layout"):
    """Gemma-1 against Gemma-2/3 decoder layout: LAYOUT/<gemma1|gemma2>_s<seed>/ with eval.json and log.jsonl.
    The table lists every run; the picture draws each run's validation text loss along training."""
    runs = []
    for m, d in find_runs(root, r"(gemma1|gemma2)_s(\d+)"):
        with open(os.path.join(d, "log.jsonl")) as f:
            log = [r for r in map(json.loads, f) if "val_loss_text" in r]
        runs.append((m.group(1), int(m.group(2)), read_eval(d), log))
    if not runs:
        raise SystemExit(f"no {root}/<gemma1|gemma2>_s<seed>/eval.json: run the commands in docs/results.md first")
    runs.sort(key=lambda r: r[:2])
    table([(name, r) for name, _, r, _ in runs], "layout", seeds=[s for _, s, _, _ in runs])
    colors = {"gemma2": [(200, 40, 40), (230, 140, 40)], "gemma1": [(40, 90, 200), (90, 170, 230)]}
    keys = [(f"{name}_s{seed}", f"{name} seed {seed}: text", colors[name][seed % 2]) for name, seed, _, _ in runs]
    by_step = {}                         # step -> {run: validation text loss}
    for (key, _, _), (*_, log) in zip(keys, runs):
        for r in log:
            by_step.setdefault(r["step"], {})[key] = r["val_loss_text"]
    steps = sorted(by_step)
    every = max(1, len(steps) // 4)      # four labelled ticks
    plot([(n, by_step[n]) for n in steps], keys, steps[-1] * 1.05, "training steps (validation text loss; lower is better)",
         [(n, f"{n}") for n in steps[every - 1::every]], os.path.join(ROOT, "docs", "layout.png"), ymax=0.4)


def edits(run="out/edit", n=16):
    """Held-out edits drawn by a checkpoint: input | edit (scored by the oracle) | target, one row each."""
    import torch
    sys.path.insert(0, ROOT)
    from unifluid import load_checkpoint
    from data import shapes
    from vae import from_pil
    try:
        model, vae, _, _ = load_checkpoint(run)
    except FileNotFoundError:
        raise SystemExit(f"no {run}/ckpt.pt: fine-tune a checkpoint on edits first (README, Editing)")
    size = model.cfg.image_size
    scenes = shapes.eval_scenes(int(n), seed=0, split="test", resolution=size)
    inputs = from_pil([s["image"] for s in scenes], size)
    targets = from_pil([s["target_image"] for s in scenes], size)
    with torch.no_grad():
        latents = model.generate_images([s["instruction"] for s in scenes], und_images=inputs,   # sampling defaults
                                        generator=torch.Generator().manual_seed(0))
        edited = vae.decode(latents).float()
    right = [shapes.score_edit(im, s["target"]) for im, s in zip(edited, scenes)]
    images = torch.stack([im for triple in zip(inputs, edited, targets) for im in triple])
    labels = [label for s, ok in zip(scenes, right)
              for label in (s["instruction"], "edit: right" if ok else "edit: wrong", "target")]
    save_grid(images.clamp(-1, 1), os.path.join(ROOT, "docs", "edits.png"), cols=6, labels=labels, cell=96)
    print(f"{sum(right)} of {len(right)} edits right (the oracle reads each edit back)")


SEGMENTS = {"text": (40, 90, 200), "und slots": (30, 150, 60), "gen slots": (200, 40, 40), "padding": (150, 150, 150)}


def masks():
    """Who attends to whom: one batch holding a generation, an understanding and an editing example, left-padded
    to one length as in training; a panel per layout and order, rows = queries, columns = keys, a cell filled
    with the key's segment colour where attention_mask allows it. The same masks are printed as text."""
    sys.path.insert(0, ROOT)
    from unifluid import KIND_GEN, KIND_PAD, KIND_TEXT, KIND_UND, SPECIALS, Config, UniFluid, WordTokenizer, \
        attention_mask
    texts = ["red circle", "color", "red", "make blue"]
    tok = WordTokenizer.build(texts * 2)                 # one token a word: a short example
    model = UniFluid(Config.preset("tiny", image_size=16, latent_size=4), tok)   # 4 und slots, 4 gen slots
    layouts = ["generation", "understanding", "editing"]
    batch = model.make_batch(["t2i", "vqa", "edit"], ["red circle", "color", "make blue"], ["", "red", ""])
    kind, ids = batch["kind"], batch["ids"]
    color = {KIND_TEXT: SEGMENTS["text"], KIND_UND: SEGMENTS["und slots"], KIND_GEN: SEGMENTS["gen slots"],
             KIND_PAD: SEGMENTS["padding"]}
    names = []                                           # a short name per position of each row
    for row_ids, row_kind in zip(ids.tolist(), kind.tolist()):
        n = {KIND_UND: 0, KIND_GEN: 0}
        row = []
        for i, k in zip(row_ids, row_kind):
            if k in n:
                n[k] += 1
            row.append({KIND_PAD: "pad", KIND_UND: f"u{n.get(KIND_UND)}", KIND_GEN: f"g{n.get(KIND_GEN)}"}.get(k)
                       or (SPECIALS[i] if i < len(SPECIALS) else tok.decode([i]).strip()))
        names.append(row)
    orders = ["random", "raster"]
    allowed = {o: attention_mask(kind, order=o)[:, 0] for o in orders}           # (3, T, T) each
    T, C, L, TOP, GAP = kind.shape[1], 16, 44, 56, 24    # cell, label widths, gap between panels
    pw, ph = L + T * C, TOP + T * C                      # one panel
    img = Image.new("RGB", (3 * pw + 2 * GAP + 20, 2 * ph + GAP + 80), "white")
    d = ImageDraw.Draw(img)
    for oi, o in enumerate(orders):
        for li, layout in enumerate(layouts):
            x0, y0 = 10 + li * (pw + GAP), 10 + oi * (ph + GAP)
            d.text((x0 + L, y0), f"{layout}, {o} order", fill="black")
            gx, gy = x0 + L, y0 + TOP
            for j, name in enumerate(names[li]):         # keys along the top (written upwards), queries down the left
                label = Image.new("RGB", (TOP - 16, C), "white")
                ImageDraw.Draw(label).text((1, 2), name[:7], fill="black")
                img.paste(label.rotate(90, expand=True), (gx + j * C, y0 + 14))
                d.text((x0, gy + j * C + 2), name[:7], fill="black")
            m = allowed[o][li]
            for q in range(T):
                for k in range(T):
                    fill = color[int(kind[li, k])] if m[q, k] else "white"
                    d.rectangle([gx + k * C, gy + q * C, gx + (k + 1) * C - 1, gy + (q + 1) * C - 1],
                                fill=fill, outline=(225, 225, 225))
            d.rectangle([gx, gy, gx + T * C - 1, gy + T * C - 1], outline="black")
            print(f"{layout}, {o} order (rows = queries, columns = keys, # = may attend):")
            for q in range(T):
                print(f"  {names[li][q]:>8} " + "".join("#" if m[q, k] else "." for k in range(T)))
    y = img.height - 36
    x = 10 + L
    d.text((x, y - 16), "rows = queries, columns = keys; a filled cell may attend, coloured by the key's segment:",
           fill="black")
    for name, c in SEGMENTS.items():
        d.rectangle([x, y + 4, x + 12, y + 16], fill=c)
        d.text((x + 18, y + 5), name, fill="black")
        x += 110
    path = os.path.join(ROOT, "docs", "masks.png")
    img.save(path)
    print(f"wrote {path}", file=sys.stderr)


def curve(run="out/curve", s_per_step=None):
    found = [(int(re.search(r"eval_step(\d+)\.json$", p).group(1)), p)
             for p in glob.glob(os.path.join(run, "eval_step*.json"))]
    if not found:
        raise SystemExit(f"no {run}/eval_step*.json: train with --accuracy_interval N first (docs/results.md, The curve)")
    if s_per_step is None:               # the training time per step in the run's log
        log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
        s_per_step = sum(1 / r["steps_per_s"] for r in log if "steps_per_s" in r) / sum("steps_per_s" in r for r in log)
    s_per_step = float(s_per_step)
    rows = sorted((step * s_per_step / 60, json.load(open(p))) for step, p in found)
    print(f"{run}: {s_per_step:.3f} s per step", file=sys.stderr)
    table([(round(m, 1), r) for m, r in rows], "training minutes")
    xmax = rows[-1][0] * 1.05
    ticks = [(m, f"{m:.0f}") for m, _ in rows]
    plot(rows, LINES, xmax, f"training minutes ({s_per_step:.2f} s per step)", ticks,
         os.path.join(ROOT, "docs", "curve.png"))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    commands = {"sweep": sweep, "curve": curve, "order": order, "layout": layout, "edits": edits, "masks": masks}
    if what not in commands:
        raise SystemExit("usage: python data/plots.py sweep [SWEEP_DIR] | curve [RUN_DIR [S]] | order [ORDER_DIR]"
                         " | layout [LAYOUT_DIR] | edits [RUN_DIR [N]] | masks")
    commands[what](*sys.argv[2:4])
