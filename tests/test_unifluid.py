"""The model in unifluid.py: each test is a behaviour the method relies on."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from unifluid import (KIND_PAD, KIND_TEXT, KIND_UND, ByteTokenizer, Config, DiffusionHead,
                      FlowMatching, GaussianDiffusion, Gemma, KVCache, UniFluid, WordTokenizer, attention_mask,
                      estimate_flops_per_example, mean_mask_ratio, patchify, positions, random_masking,
                      unpatchify)


def tiny(**kw):
    torch.manual_seed(0)
    return UniFluid(Config.preset("tiny", **kw))


def randomize_head(model):
    """The head starts at exactly zero output; give it weights so generation tests are not trivial."""
    with torch.no_grad():
        for p in model.diffusion.parameters():
            p.normal_(0, 0.02)


def batch_for(model, tasks, prompts, answers=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    gen = torch.randn(len(tasks), c.num_image_tokens, c.token_dim, generator=g)
    img = torch.rand(len(tasks), 3, c.image_size, c.image_size, generator=g) * 2 - 1
    return model.make_batch(tasks, prompts, answers, gen, img)


def hidden(model, batch, gen_in=None):
    """Decoder outputs for every position of a batch, with explicit gen-slot inputs."""
    kind = batch["kind"]
    if gen_in is None and "gen_tokens" in batch:
        tokens = batch["gen_tokens"]
        gen_in = model.gen_inputs(tokens, torch.zeros(tokens.shape[:2], dtype=torch.bool))
    x = model.embed(batch["ids"], kind, gen_in, batch.get("und_images"))
    return model.llm(x, positions(kind), model.masks(kind))


# ---- attention structure (unifluid.py's docstring: the three layouts)

def test_later_text_token_leaves_earlier_logits_unchanged():
    m = tiny().eval()
    b1 = batch_for(m, ["caption"], [""], ["a red circle above a blue square"])
    b2 = {k: v.clone() for k, v in b1.items()}
    b2["ids"][0, -3] = 100                                     # change a late text token
    h1, h2 = m.llm.logits(hidden(m, b1)), m.llm.logits(hidden(m, b2))
    assert torch.equal(h1[:, :-3], h2[:, :-3]) or torch.allclose(h1[:, :-3], h2[:, :-3], atol=1e-6)
    assert not torch.allclose(h1[:, -3:], h2[:, -3:], atol=1e-4)


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_text_never_sees_a_later_image_block(task):
    m = tiny().eval()
    b = batch_for(m, [task], ["make the circle green"])
    text = b["kind"][0] == KIND_TEXT
    h1 = hidden(m, b)
    b["gen_tokens"] = b["gen_tokens"] + 5.0                    # a completely different image
    h2 = hidden(m, b)
    assert torch.allclose(h1[0, text], h2[0, text], atol=1e-6)
    assert not torch.allclose(h1[0, ~text], h2[0, ~text], atol=1e-4)


def test_image_slots_bidirectional_in_random_order_causal_in_raster():
    for order in ["random", "raster"]:
        m = tiny(order=order).eval()
        b = batch_for(m, ["t2i"], ["a red circle"])
        N, D = m.cfg.num_image_tokens, m.cfg.d_model
        gen_in = torch.randn(1, N, D)
        h1 = hidden(m, b, gen_in)[0, -N:]
        j = N // 2
        gen_in2 = gen_in.clone()
        gen_in2[0, j] += 1.0                                   # perturb the input of slot j
        changed = (hidden(m, b, gen_in2)[0, -N:] - h1).abs().amax(-1) > 1e-5
        if order == "random":
            assert changed.all(), "every slot must see every other slot of its block"
        else:
            assert not changed[:j].any() and changed[j:].all(), "raster: slot i sees only slots <= i"


def test_und_slots_see_each_other_and_text_sees_und():
    m = tiny()
    b = batch_for(m, ["vqa", "t2i"], ["what color is the circle?", "a red circle"], ["red", ""])
    mask = attention_mask(b["kind"])[:, 0]                     # (B, T, T)
    und = b["kind"][0] == KIND_UND
    assert mask[0][und][:, und].all()                          # bidirectional within the und block
    text = b["kind"][0] == KIND_TEXT
    assert mask[0][text][:, und].all()                         # text reads the image before it
    pad = b["kind"] == KIND_PAD
    keys_pad = mask[1][~pad[1]][:, pad[1]]
    assert not keys_pad.any()                                  # padding is never attended


def test_flex_attention_matches_sdpa():
    m = tiny().eval()
    b = batch_for(m, ["t2i", "vqa", "edit"], ["a red circle", "what shape?", "make it blue"], ["", "circle", ""])
    with torch.no_grad():
        torch.manual_seed(1)
        ref = m(b)
        m.attn_impl = "flex"
        torch.manual_seed(1)
        out = m(b)
    for k in ref:
        assert torch.allclose(ref[k], out[k], atol=1e-5), k


# ---- decoding

def test_kv_cached_text_decoding_matches_full_recomputation():
    m = tiny().eval()
    with torch.no_grad():                                      # untrained logits are nearly flat; sharpen them
        m.llm.embed_tokens.weight.normal_(0, 0.2)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    t1, l1 = m.generate_text(img, ["", "what color is it?"], max_new_tokens=12, return_logits=True)
    t2, l2 = m.generate_text(img, ["", "what color is it?"], max_new_tokens=12, use_cache=False, return_logits=True)
    assert t1 == t2
    assert l1.shape == l2.shape and (l1 - l2).abs().max() < 1e-5


def test_decoder_states_at_chosen_rows_equal_the_full_pass_at_those_rows():
    """Sampling asks the decoder only for the slots it reveals (rows=): the last block then computes only
    them, with and without the prefix cache, and must give what the full pass gives there."""
    m = tiny().eval()
    b = batch_for(m, ["t2i", "t2i"], ["a red circle", "two blue squares"], ["", ""])
    kind = b["kind"]
    N = m.cfg.num_image_tokens
    T, P = kind.shape[1], kind.shape[1] - N
    gen_in = m.gen_inputs(torch.randn(2, N, m.cfg.token_dim), torch.rand(2, N) < 0.5)   # some slots masked
    x, pos, masks = m.embed(b["ids"], kind, gen_in), positions(kind), m.masks(kind)
    slots = torch.stack([torch.randperm(N)[:5].sort().values for _ in range(2)])   # (B, 5) image slots
    with torch.no_grad():
        full = m.llm(x, pos, masks)
        want = full[torch.arange(2)[:, None], slots + P]
        got = m.llm(x, pos, masks, rows=slots + P)
        cache = KVCache(m.cfg, 2, T, "cpu", x.dtype)
        m.llm(x[:, :P], pos[:, :P], {k: v[:, :, :P, :P] for k, v in masks.items()}, cache, 0)
        cached = m.llm(x[:, P:], pos[:, P:], {k: v[:, :, P:] for k, v in masks.items()}, cache, P, rows=slots)
    assert got.shape == (2, 5, m.cfg.d_model)
    assert (got - want).abs().max() < 1e-5 and (cached - want).abs().max() < 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_image_generation_cache_and_seed(sampler):
    m = tiny().eval()
    randomize_head(m)
    run = lambda seed, **kw: m.generate_images(["a red circle", "two blue squares"], num_iter=4, guidance=3.0,
                                               diffusion_steps=8, generator=torch.Generator().manual_seed(seed),
                                               sampler=sampler, **kw)
    # an untrained eps head leaves x0 = (x_T - eps) / sqrt(acp) ~ 1e4 at t = T (unclipped, as MAR's):
    # compare at float32 rounding relative to the tokens' scale
    close = lambda x, y: (x - y).abs().max() <= 1e-5 * x.abs().max()
    a, b, c = run(0), run(0, use_cache=False), run(1)
    C, s = m.cfg.latent_channels, m.cfg.latent_size
    assert a.shape == (2, C, s, s) and torch.isfinite(a).all()
    assert close(a, b), "prefix KV cache must not change the samples"
    assert torch.equal(run(0), a), "same seed, same images"
    assert not torch.allclose(a, c)
    assert close(a, run(0, batch_cfg=False)), "cond+uncond in one batch = separate passes"
    edit = m.generate_images(["make it blue"], num_iter=4, guidance=2.0, diffusion_steps=4,
                             und_images=torch.zeros(1, 3, 32, 32), sampler=sampler)
    assert edit.shape == (1, C, s, s)


def test_raster_generation_runs():
    m = tiny(order="raster").eval()
    randomize_head(m)
    out = m.generate_images(["a red circle"], guidance=2.0, diffusion_steps=4)
    assert out.shape[0] == 1 and torch.isfinite(out).all()


@pytest.mark.parametrize("order,steps", [("random", 5), ("raster", 16)])
def test_on_step_sees_each_reveal_and_leaves_the_sample_unchanged(order, steps):
    """One call per reveal step (num_iter in random order, one per slot in raster order); the masked slots
    shrink to none, a drawn slot never changes, the last call holds the sample, and the hook changes nothing."""
    m = tiny(order=order).eval()
    randomize_head(m)
    run = lambda **kw: m.generate_images(["a red circle", "two blue squares"], num_iter=5, guidance=2.0, diffusion_steps=4,
                                         generator=torch.Generator().manual_seed(0), **kw)
    seen = []
    out = run(on_step=lambda k, latents, mask: seen.append((k, latents.clone(), mask.clone())))
    assert [k for k, _, _ in seen] == list(range(steps))
    masked = [int(mask.sum()) for _, _, mask in seen]
    assert all(a > b for a, b in zip(masked, masked[1:])) and masked[-1] == 0
    p = m.cfg.patch_size
    for (_, before, mask), (_, after, _) in zip(seen, seen[1:]):
        drawn = ~mask.unsqueeze(-1).expand(-1, -1, m.cfg.token_dim)          # (B, N, Dt)
        assert torch.equal(patchify(before, p)[drawn], patchify(after, p)[drawn]), "a drawn slot changed"
    assert torch.equal(seen[-1][1], out) and torch.equal(run(), out)


# ---- masking and the image loss

def test_masked_fraction_and_loss_on_masked_slots_only(monkeypatch):
    N = 16
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        frac = random_masking(4, N, g).float().mean(1)
        assert ((frac >= 0.7 - 1e-6) & (frac <= 1.0)).all()
        assert (frac == frac[0]).all()                          # one ratio per step, as MAR
    low = [random_masking(1, N, g, low=0.25).float().mean().item() for _ in range(400)]
    assert min(low) >= 0.25 - 1e-6 and 0.1 < np.mean([f < 0.7 for f in low]) < 0.4   # Config.mask_ratio_min
    wide = [random_masking(1, N, g, low=0.0, std=1.0).float().mean().item() for _ in range(400)]
    assert 0.3 < np.mean([f < 0.5 for f in wide]) < 0.5                              # near uniform
    assert abs(np.mean(wide) - mean_mask_ratio(0.0, 1.0)) < 0.05      # what the FLOP estimate counts
    assert abs(mean_mask_ratio() - 0.867) < 1e-3                      # MAR's
    m = tiny()
    b = batch_for(m, ["t2i", "t2i"], ["a", "b"])
    seen = {}
    original, head = m.diffusion.loss, m.diffusion.head.forward

    def spy(target, z, mul=1, weight=None):
        seen["target"], seen["weight"] = target, weight
        return original(target, z, mul, weight)
    monkeypatch.setattr(m.diffusion, "loss", spy)
    monkeypatch.setattr(m.diffusion.head, "forward", lambda x, t, c: seen.setdefault("rows", x.shape[0]) and head(x, t, c))
    g = torch.Generator().manual_seed(3)
    m(b, generator=g)
    mask = random_masking(2, N, torch.Generator().manual_seed(3))
    assert torch.equal(seen["target"], b["gen_tokens"].flatten(0, 1))
    assert torch.equal(seen["weight"], mask.flatten())                # the loss counts the masked slots only
    assert seen["rows"] == int(mask.sum()) * m.cfg.diffusion_batch_mul   # and eager, only they reach the head


# ---- the diffusion head

def test_diffusion_head_is_zero_at_init_and_overfits():
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=8, cond_dim=16, width=64, depth=2)
    x, z = torch.randn(32, 8), torch.randn(32, 16)
    assert torch.equal(head(x, torch.randint(0, 1000, (32,)), head.condition(z)), torch.zeros(32, 8))
    diff = GaussianDiffusion(head)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)
    target = torch.randn(4, 8)
    cond = torch.randn(4, 16)
    losses = []
    for _ in range(300):
        loss = diff.loss(target, cond, mul=16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.7                                     # predicting 0 for unit noise: MSE ~ 1
    assert sum(losses[-20:]) / 20 < 0.4


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_training_choices(prediction):
    """min-SNR-gamma: each token's loss is min(SNR, gamma) times its clean token's squared error;
    logit-normal timesteps gather at mid noise; in eval mode the loss is the plain uniform-t one."""
    class Spy(DiffusionHead):                                  # records what the loss fed the head
        def forward(self, x, t, c):
            self.seen = (x, t)
            return super().forward(x, t, c)
    torch.manual_seed(0)
    head = Spy(token_dim=4, cond_dim=3, width=16, depth=1)
    torch.nn.init.normal_(head.out.weight, std=0.5)                 # a head that is not zero: errors to weigh
    target, z = torch.randn(4000, 4), torch.randn(4000, 3)
    make = lambda **kw: GaussianDiffusion(head, prediction=prediction, **kw)
    def loss(diff, seed=1):
        torch.manual_seed(seed)
        return diff.loss(target, z)
    plain, weighted = make(), make(snr_gamma=5.0)
    got = loss(weighted)
    x_t, t = head.seen
    with torch.no_grad():
        a = plain.acp[t].unsqueeze(1)
        eps = plain.eps_from(head(x_t, t, head.condition(z)), x_t, a)
        x0_err = ((x_t - (1 - a).sqrt() * eps) / a.sqrt() - target).pow(2).mean(1)
        want = ((a / (1 - a)).squeeze(1).clamp(max=5.0) * x0_err).mean()
    assert torch.allclose(got, want, rtol=1e-3), (got, want)
    weighted.eval()
    assert torch.equal(loss(weighted), loss(plain)), "eval mode: the plain loss, comparable across recipes"
    loss(make(t_sampling="logit_normal"))
    t = head.seen[1].float()
    assert abs(t.mean().item() - 500) < 20 and 190 < t.std().item() < 230   # sigmoid(N(0, 1)): std 0.21
    loss(plain)
    assert head.seen[1].float().std().item() > 270                            # uniform: std 289
    with pytest.raises(ValueError, match="t_sampling"):
        make(t_sampling="cosine")


@pytest.mark.parametrize("prediction,learn_sigma", [("eps", False), ("v", False), ("eps", True), ("flow", False)])
def test_diffusion_sampler_reproduces_a_conditional_distribution(prediction, learn_sigma):
    torch.manual_seed(0)
    head = DiffusionHead(token_dim=2, cond_dim=2, width=128, depth=2, out_dim=4 if learn_sigma else 2)
    diff = (FlowMatching(head) if prediction == "flow"
            else GaussianDiffusion(head, prediction=prediction, learn_sigma=learn_sigma))
    means = torch.tensor([[1.5, -1.0], [-1.0, 0.5]])
    stds = torch.tensor([0.5, 0.15])
    conds = torch.eye(2)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(800):
        c = torch.randint(0, 2, (256,))
        x = means[c] + stds[c, None] * torch.randn(256, 2)
        loss = diff.loss(x, conds[c])
        opt.zero_grad()
        loss.backward()
        opt.step()
    g = torch.Generator().manual_seed(0)
    # the deterministic sampler too, for a v head: an eps head's error at t = T, where x0 = (x - eps) / ~5e-5,
    # is carried to the end by ddim and washed out by ddpm's noise (docs/sampling.md)
    for sampler, steps in (("ddpm", 50),) + ((("ddim", 50),) if prediction in ("v", "flow") else ()):
        for i in range(2):
            s = diff.sample(conds[i].expand(1000, 2), num_steps=steps, generator=g, sampler=sampler)
            assert (s.mean(0) - means[i]).abs().max() < 0.1, (sampler, i, s.mean(0))
            assert ((s.std(0) / stds[i]) - 1).abs().max() < 0.25, (sampler, i, s.std(0))
    # classifier-free guidance at scale 1 is the conditional sample
    z_c, z_u = conds[0].expand(100, 2), torch.zeros(100, 2)
    a = diff.sample(z_c, num_steps=20, generator=torch.Generator().manual_seed(1))
    b = diff.sample(torch.cat([z_c, z_u]), num_steps=20, guidance=1.0, generator=torch.Generator().manual_seed(1))
    assert (a - b).abs().max() < 1e-4
    # temperature scales the spread
    cold = diff.sample(conds[0].expand(2000, 2), num_steps=50, temperature=0.5, generator=g)
    assert cold.std(0).mean() < s.std(0).mean() * 5 and cold.std(0).mean() < 0.8 * 0.5


def test_sampler_draws_as_mars():
    """MAR's p_sample_loop: x_T ~ N(0, I) whatever the temperature, which scales only the noise of each
    step; ddim draws x_T alone and refuses a temperature; with clip_x0 None nothing is clamped."""
    torch.manual_seed(0)
    diff = GaussianDiffusion(DiffusionHead(token_dim=3, cond_dim=2, width=16, depth=1))   # zero init: eps = 0
    z = torch.randn(5, 2)
    draw = lambda sampler="ddpm", steps=2, temperature=1.0: diff.sample(
        z, steps, temperature, generator=torch.Generator().manual_seed(0), sampler=sampler)
    assert torch.equal(draw(steps=1, temperature=0.3), draw(steps=1)), "temperature must not scale x_T"
    assert not torch.equal(draw(temperature=0.3), draw()), "temperature scales the per-step noise"
    g = torch.Generator().manual_seed(0)
    x_T, noise = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    a, ap = diff.acp[-1].double(), diff.acp[0].double()      # steps=2: t = 999, then t = 0
    diff.clip_x0 = None                                     # MAR's sampler, written out for eps = 0
    beta = 1 - a / ap
    x = (ap.sqrt() * beta * x_T / a.sqrt() + (1 - ap) * (1 - beta).sqrt() * x_T) / (1 - a) \
        + (beta * (1 - ap) / (1 - a)).sqrt() * noise
    want = (x / ap.sqrt()).float()
    got = draw()
    assert got.abs().max() > 100 and ((got - want).abs().max() / want.abs().max()) < 1e-5
    diff.clip_x0 = 10.0
    assert draw().abs().max() < 11, "the clamp bounds the predicted clean token"
    ddim = draw("ddim", steps=4)
    assert torch.equal(ddim, draw("ddim", steps=4)) and not torch.equal(ddim, draw(steps=4))
    with pytest.raises(ValueError, match="temperature"):
        draw("ddim", temperature=0.5)


def test_sampler_defaults_follow_the_head():
    """ddim in 10 steps only where it holds accuracy (a v or flow head, temperature 1); ancestral ddpm in 20 otherwise."""
    v, eps = tiny(prediction="v"), tiny()
    assert v.sampler_defaults() == ("ddim", 10) and v.sampler_defaults(0.9) == ("ddpm", 20)
    assert eps.sampler_defaults() == ("ddpm", 20)
    assert eps.sampler_defaults(1.0, "ddim", 7) == ("ddim", 7) and v.sampler_defaults(1.0, None, 30) == ("ddim", 30)


def test_guidance_at_the_last_reveal_step_is_mars(monkeypatch):
    """MAR keeps >= 1 slot in the masked count that sets the guidance, so its last step guides with
    1 + (guidance - 1)(N - 1)/N, not guidance; every slot is still revealed."""
    m = tiny().eval()
    scales, sample = [], m.diffusion.sample
    def spy(z, steps, temperature, scale, *args):
        scales.append(scale)
        return sample(z, steps, temperature, scale, *args)
    monkeypatch.setattr(m.diffusion, "sample", spy)
    N, guidance = m.cfg.num_image_tokens, 3.0
    m.generate_images(["a red circle"], num_iter=4, guidance=guidance, diffusion_steps=2)
    assert len(scales) == 4 and scales[-1] == pytest.approx(1 + (guidance - 1) * (N - 1) / N)
    assert scales == sorted(scales)


# ---- the joint loss and image_weight (README, Training)

@pytest.mark.parametrize("w,tasks", [(1.0, ["caption", "vqa"]), (0.0, ["t2i", "t2i"])])
def test_absent_side_of_the_loss_gives_zero_gradients(w, tasks):
    m = tiny(image_weight=w)
    b = batch_for(m, tasks, ["", "what?"] if w == 1.0 else ["a", "b"], ["a red circle", "red"] if w == 1.0 else None)
    out = m(b)
    out["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert out["loss"].item() == 0.0


def test_loss_is_weighted_sum():
    m = tiny(image_weight=0.7)                   # the loss weight is part of the config (--image_weight)
    b = batch_for(m, ["t2i", "vqa"], ["a red circle", "what color?"], ["", "red"])
    torch.manual_seed(0)
    out = m(b)
    assert out["loss_image"] > 0 and out["loss_text"] > 0
    assert math.isclose(out["loss"].item(), 0.7 * out["loss_image"].item() + 0.3 * out["loss_text"].item(), rel_tol=1e-5)


@pytest.mark.parametrize("text_loss", ["token", "row"])
def test_text_loss_averages_over_answer_tokens_or_over_rows(text_loss):
    """Config.text_loss: "token" weighs a row by its answer's length (a caption outweighs a one-word answer),
    "row" weighs every row alike; each is the same loss as the rows taken one at a time, so weighted."""
    m = tiny(text_loss=text_loss).eval()
    tasks, prompts, answers = ["caption", "vqa"], ["", "what color?"], ["a small red circle above a blue square", "red"]
    img = torch.rand(2, 3, m.cfg.image_size, m.cfg.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    b = m.make_batch(tasks, prompts, answers, und_images=img)
    one = lambda i: m.make_batch(tasks[i:i + 1], prompts[i:i + 1], answers[i:i + 1], und_images=img[i:i + 1])
    alone = [m(one(i))["loss_text"].item() for i in range(2)]
    n = (b["targets"] != -100).sum(1).tolist()
    assert n[0] > n[1] > 0
    want = sum(x * k for x, k in zip(alone, n)) / sum(n) if text_loss == "token" else sum(alone) / 2
    assert math.isclose(m(b)["loss_text"].item(), want, rel_tol=1e-4)


def test_an_unknown_text_loss_is_refused():
    with pytest.raises(ValueError, match="text_loss"):
        tiny(text_loss="sample")


MAR_OPTIONS = dict(img_input_ln=True, prediction="v", learn_sigma=True)


@pytest.mark.parametrize("options", [{}, MAR_OPTIONS, dict(prediction="flow")], ids=["default", "mar_options", "flow"])
def test_tiny_preset_trains_without_nans(options):
    m = tiny(**options)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    b = batch_for(m, ["t2i", "caption", "vqa", "edit"], ["a red circle", "", "what color?", "make it blue"],
                  ["", "a red circle", "red", ""])
    first = None
    for step in range(30):
        out = m(b, generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(out["loss"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or (out["loss_text"].item(), out["loss_image"].item())
    assert out["loss_text"].item() < 0.5 * first[0]
    assert sum(p.numel() for p in m.parameters()) < 5e6
    m.eval()
    lat = m.generate_images(["a red circle"], num_iter=4, diffusion_steps=5, generator=torch.Generator().manual_seed(0))
    assert lat.shape == (1, m.cfg.latent_channels, m.cfg.latent_size, m.cfg.latent_size) and torch.isfinite(lat).all()


def test_a_flow_head_refuses_the_ddpm_only_options():
    for option in (dict(learn_sigma=True), dict(snr_gamma=5.0)):
        with pytest.raises(ValueError, match="flow head"):
            tiny(prediction="flow", **option)
    assert isinstance(tiny(prediction="flow").diffusion, FlowMatching)


def test_repa_pulls_the_gen_slot_states_towards_the_vit_features_of_the_image():
    """REPA: the loss adds repa_weight * (1 - cos) between an MLP of the gen slots' middle states and the
    ViT's features of the image the tokens encode; training lowers it; the ViT gets no gradient from it."""
    m = tiny(repa_weight=0.5, repa_layer=1)
    b = batch_for(m, ["t2i", "t2i"], ["a red circle", "a blue square"])      # no row reads an und image
    g = torch.Generator().manual_seed(1)
    b["gen_images"] = torch.rand(2, 3, m.cfg.image_size, m.cfg.image_size, generator=g) * 2 - 1
    plain = {k: v for k, v in b.items() if k != "gen_images"}        # the same batch without the images

    def repa_term():
        torch.manual_seed(0)
        with_images = m(b)["loss"]
        torch.manual_seed(0)
        return (with_images - m(plain)["loss"]).item() / m.cfg.repa_weight
    first = repa_term()
    assert 0.5 < first < 1.5                                          # 1 - cos of unrelated vectors: ~1
    m.vision.requires_grad_(False)                                    # what the REPA term alone changes
    opt = torch.optim.AdamW(m.repa_proj.parameters(), lr=1e-2)
    for _ in range(30):
        loss = m(b)["loss"] - m(plain)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert repa_term() < first - 0.3
    m.vision.requires_grad_(True)
    m.zero_grad()
    m(b)["loss"].backward()
    assert all(p.grad is None for p in m.vision.parameters()) and m.repa_proj[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same grid"):
        tiny(repa_weight=0.5, vit_patch=4)


def test_a_checkpoint_of_an_earlier_version_loads_or_says_why():
    m = tiny()
    old = dict(model=m.state_dict(), ema=None, tokenizer=m.tokenizer.state_dict(),   # fields since removed:
               config={**m.cfg.to_dict(), "init": "xavier", "head_pos_embed": False})  # neither changes this model
    again = UniFluid.from_checkpoint(old)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="head_pos_embed"):             # a model this code cannot build
        UniFluid.from_checkpoint({**old, "config": {**old["config"], "head_pos_embed": True}})


# ---- tokenizers

UNICODE = ["", "a red circle", "héllo wörld", "🙂👍🏽 emoji", "tab\tnew\nline\r\x00\x07", "  two  spaces ",
           "日本語のテキスト", "mixed: red 🙂 circle, \u200b zero-width", "a" * 300]


@pytest.mark.parametrize("tok", [ByteTokenizer(), WordTokenizer.build(["a red circle above a blue square"] * 3)])
def test_tokenizers_round_trip_any_string(tok):
    for s in UNICODE:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s


def test_generated_answer_words_keep_their_spaces():
    """An answer starts with a word without its leading space ('large'); a model that repeats such a word
    must not print 'largelargeno', while every encoded text still decodes exactly."""
    tok = WordTokenizer.build(["large", "large", "no", "no", "what size is the circle"] * 2)
    large, no = tok.index["large"], tok.index["no"]
    assert tok.decode([large, large, no]) == "large large no"
    assert tok.decode(tok.encode("large\nno")) == "large\nno" and tok.decode(tok.encode("xlarge no")) == "xlarge no"


def test_word_tokenizer_is_short_on_captions():
    caps = ["a small red circle above a blue square", "a large green triangle"] * 5
    tok = WordTokenizer.build(caps)
    assert len(tok.encode(caps[0])) == 8
    assert len(ByteTokenizer().encode(caps[0])) == len(caps[0])
    assert WordTokenizer(tok.state_dict()["words"]).encode(caps[0]) == tok.encode(caps[0])


# ---- shapes, presets and FLOPs

def test_gemma2_2b_preset_has_gemma2_parameter_count():
    cfg = Config.preset("gemma2-2b")
    with torch.device("meta"):
        llm = Gemma(cfg)
    assert sum(p.numel() for p in llm.parameters()) == 2_614_341_888


def test_presets_and_patchify():
    for name in ["tiny", "small", "base", "gemma3-1b"]:
        Config.preset(name)
    with pytest.raises(ValueError, match="unknown model preset"):
        Config.preset("huge")
    lat = torch.randn(3, 4, 8, 8)
    tok = patchify(lat, 2)
    assert tok.shape == (3, 16, 16)
    assert torch.equal(unpatchify(tok, 2, 4), lat)
    assert torch.equal(tok[0, 1], lat[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))   # raster order
    cfg = Config.preset("small")
    n = UniFluid(cfg).num_params()                  # ~1.4M: 6 * params * tokens, tokens between 20 and 60
    f = estimate_flops_per_example(cfg, {"t2i": 0.5, "caption": 0.5})
    assert 1.2e6 < n < 1.6e6 and 6 * 0.5 * n * 20 < f < 6 * n * 60


def test_vit_pool_concatenates_neighbouring_patches_into_one_slot():
    cfg = replace(Config.preset("tiny"), image_size=32, vit_patch=4, vit_pool=2)
    assert (cfg.num_vit_tokens, cfg.num_und_tokens) == (64, 16)
    m = UniFluid(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.vision(x)
    assert feats.shape == (2, 16, 4 * cfg.vit_width)
    m.vision.pool = 1
    flat = m.vision(x).view(2, 8, 8, cfg.vit_width)               # the 8 x 8 grid of ViT outputs
    assert torch.equal(feats[0, 1], flat[0, 0:2, 2:4].reshape(-1))  # slot (0, 1) = outputs rows 0-1, cols 2-3
    m.vision.pool = 2
    b = batch_for(m, ["caption", "vqa"], ["", "what color is the circle"], ["a red circle", "red"])
    assert torch.isfinite(m(b)["loss"])


def test_vit_stem_convolves_before_the_patch_embedding_and_keeps_the_slots():
    cfg = replace(Config.preset("tiny"), image_size=32, vit_patch=8, vit_stem=2)
    m = UniFluid(cfg).eval()
    convs = [l for l in m.vision.embeddings.stem if isinstance(l, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [(3, 8, (2, 2)), (8, 16, (2, 2))]
    assert m.vision.embeddings.patch_embedding.kernel_size == (2, 2)   # 8 px patches = two halvings, then 2
    x = torch.randn(2, 3, 32, 32)
    assert m.vision(x).shape == (2, cfg.num_und_tokens, cfg.vit_width)
    y = x.clone()
    y[:, :, 16:, 16:] = 0                        # the stem is local: the top-left slot does not see that corner
    assert torch.equal(m.vision.embeddings.stem(x)[..., :4, :4], m.vision.embeddings.stem(y)[..., :4, :4])
    b = batch_for(m, ["caption", "vqa"], ["", "what color is the circle"], ["a red circle", "red"])
    m(b)["loss"].backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in convs)
    assert not any("stem" in k for k in UniFluid(Config.preset("tiny")).state_dict())   # off: SigLIP's names only
    with pytest.raises(ValueError, match="vit_patch"):
        UniFluid(replace(cfg, vit_patch=6))


def test_dropout_is_active_in_training_only():
    m = tiny(dropout=0.5)
    b = batch_for(m, ["vqa"], ["what color?"], ["red"])
    m.train()
    a, c = hidden(m, b), hidden(m, b)
    assert not torch.allclose(a, c)                            # a new dropout mask each call
    m.eval()
    assert torch.equal(hidden(m, b), hidden(m, b))


def test_discretized_likelihood_is_the_normal_mass_of_the_bin():
    """The t = 0 term of the learned-variance loss (improved DDPM, MAR): the probability of x's bin of width
    2/255 under N(mean, scale), the outermost bins open to infinity."""
    from unifluid import discretized_gaussian_log_likelihood
    x = torch.tensor([-1.0, 0.05, 0.1, 0.17, 1.0])          # within 2 std: the tanh CDF is MAR's approximation
    mean, scale = torch.tensor([-0.98, 0.1, 0.1, 0.1, 0.97]), torch.full_like(x, 0.05)
    Phi = torch.special.ndtr
    plus, minus = Phi((x - mean + 1 / 255) / scale), Phi((x - mean - 1 / 255) / scale)
    exact = torch.where(x < -0.999, plus, torch.where(x > 0.999, 1 - minus, plus - minus)).clamp(min=1e-12).log()
    got = discretized_gaussian_log_likelihood(x, mean, scale.log())
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=2e-3)


def test_guidance_ramps_linearly_with_the_revealed_fraction(monkeypatch):
    """MAR's linear CFG schedule: a step's scale is 1 + (guidance - 1) * (revealed after it) / N, so it rises
    with the cosine reveal schedule; MAR counts at least one slot as still masked, the last step's too."""
    model = tiny().eval()
    N, steps, guidance = model.cfg.num_image_tokens, 4, 3.0
    scales = []

    def sample(z, diffusion_steps, temperature, scale, *rest):         # the head, recording its guidance
        scales.append(scale)
        return torch.zeros(z.shape[0] // 2, model.cfg.token_dim)
    monkeypatch.setattr(model.diffusion, "sample", sample)
    model.generate_images(["a red circle"], num_iter=steps, guidance=guidance)
    masked = [max(1, math.floor(N * math.cos(math.pi / 2 * (k + 1) / steps))) for k in range(steps)]
    assert scales == pytest.approx([1 + (guidance - 1) * (N - m) / N for m in masked]), (scales, masked)
    assert 1 < scales[0] < scales[1] < scales[2] < scales[3] < guidance
