"""Draw the --image_weight trade-off (paper Fig. 3, at small scale) from the shapes eval.json of each run.

    (the loop in README.md, "The trade-off")   # one run per weight into out/sweep/w<weight>
    python data/plot_sweep.py                  # -> docs/tradeoff.png (the README's figure), table on stdout

Pillow only (no matplotlib): x = image_weight, y = held-out accuracy of generation, captions, VQA.
"""
import glob
import json
import os
import sys

from PIL import Image, ImageDraw

root = sys.argv[1] if len(sys.argv) > 1 else "out/sweep"
runs = []
for path in glob.glob(os.path.join(root, "w*", "eval.json")):
    w = float(os.path.basename(os.path.dirname(path))[1:])
    runs.append((w, json.load(open(path))))
runs.sort()
if not runs:
    raise SystemExit(f"no {root}/w*/eval.json: run the sweep in README.md first")

keys = [("gen_accuracy", "generation (GenEval-style)", (200, 40, 40)),
        ("caption_accuracy", "caption accuracy", (40, 90, 200)),
        ("vqa_accuracy", "VQA accuracy", (30, 150, 60))]
print("| image_weight | " + " | ".join(k for k, _, _ in keys) + " | " +
      " | ".join(f"gen/{t}" for t in ("single_object", "two_object", "counting", "colors", "position", "color_attr")) +
      " | val_loss_image | val_loss_text |")
print("|---" * (4 + 6 + 2) + "|")
for w, r in runs:
    print(f"| {w:g} | " + " | ".join(f"{r[k]:.3f}" for k, _, _ in keys) + " | " +
          " | ".join(f"{r['gen/' + t]:.2f}" for t in ("single_object", "two_object", "counting", "colors",
                                                        "position", "color_attr")) +
          f" | {r['val_loss_image']:.4f} | {r['val_loss_text']:.4f} |")

W, H, L, B, T, R = 640, 400, 60, 50, 20, 190          # size and margins (left, bottom, top, right)
img = Image.new("RGB", (W, H), "white")
d = ImageDraw.Draw(img)
px = lambda w: L + w * (W - L - R)
py = lambda a: H - B - a * (H - B - T)
d.rectangle([L, T, W - R, H - B], outline="black")
for a in (0, 0.25, 0.5, 0.75, 1.0):
    d.line([L - 4, py(a), L, py(a)], fill="black")
    d.text((L - 34, py(a) - 6), f"{a:.2f}", fill="black")
for w, _ in runs:
    d.line([px(w), H - B, px(w), H - B + 4], fill="black")
    if w == 1 or all(abs(px(w) - px(v)) > 25 for v, _ in runs if v > w):   # label ticks that do not overlap
        d.text((px(w) - 8, H - B + 6), f"{w:g}", fill="black")
d.text((L + 120, H - 22), "image_weight w  (0 = understanding only, 1 = generation only)", fill="black")
for i, (k, label, color) in enumerate(keys):
    pts = [(px(w), py(r[k])) for w, r in runs]
    d.line(pts, fill=color, width=2)
    for x, y in pts:
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    d.text((W - R + 10, T + 20 + 18 * i), label, fill=color)
out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "tradeoff.png")
img.save(out)
print(f"wrote {out}", file=sys.stderr)
