"""vae.py: shapes of encode/decode, training, save/load, and loading external checkpoint layouts.

External weights cannot be downloaded here, so each external layout is exercised by writing a tiny
random checkpoint in that layout (renaming our own model's tensors) and checking that loading it
reproduces the model whose weights were written.
"""
import json
import os
import random

import pytest
import torch

from vae import (AutoencoderKL, VAEConfig, _ldm_to_diffusers, from_pil, load_vae, psnr, save_vae,
                 to_pil, train_vae)

# tiny widths: every preset keeps its layout (levels, attention, latent channels) but costs nothing
TINY = dict(ch=8, norm_groups=4)


def shapes_images(n, size=16, seed=0):
    """Synthetic flat-colour scenes (rectangles, circles) in [-1, 1]: independent of data/."""
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    colors = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 40), (250, 250, 250)]
    pils = []
    for _ in range(n):
        im = Image.new("RGB", (size, size), rng.choice([(0, 0, 0), (128, 128, 128)]))
        d = ImageDraw.Draw(im)
        for _ in range(rng.randint(1, 3)):
            s = rng.randint(size // 4, size // 2)
            x, y = rng.randint(0, size - s), rng.randint(0, size - s)
            (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s], fill=rng.choice(colors))
        pils.append(im)
    return from_pil(pils, size)


def random_model(preset="shapes", **overrides):
    """A model whose every tensor is random (GroupNorm affine included), so a mis-mapped name shows."""
    vae = AutoencoderKL(VAEConfig.preset(preset, **{**TINY, **overrides})).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return vae


@pytest.mark.parametrize("preset,size", [("shapes", 32), ("sd", 32), ("mar-kl16", 32)])
def test_encode_decode_shapes_and_ranges(preset, size):
    vae = AutoencoderKL(VAEConfig.preset(preset, **TINY)).eval()
    f = {"shapes": 4, "sd": 8, "mar-kl16": 16}[preset]
    assert vae.downsample == f
    x = shapes_images(2, size)
    z = vae.encode(x)
    assert z.shape == (2, vae.latent_channels, size // f, size // f)
    assert not torch.equal(vae.encode(x, sample=True), z)  # sampling draws from the posterior
    y = vae.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    mean, logvar = vae.posterior(x)
    assert torch.allclose(mean * vae.scale_factor, z)


def test_preset_scale_factors_and_overrides():
    assert VAEConfig.preset("sd").scale_factor == 0.18215
    assert VAEConfig.preset("mar-kl16").scale_factor == 0.2325
    assert VAEConfig.preset("mar-kl16", latent_channels=8).latent_channels == 8
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.preset("nope")


def test_pil_round_trip():
    x = shapes_images(3, 16)
    pils = to_pil(x)
    assert len(pils) == 3 and pils[0].size == (16, 16)
    assert torch.allclose(from_pil(pils, 16), x, atol=1 / 127)
    # non-square input: shorter side resized, then center-cropped
    from PIL import Image
    wide = Image.new("RGBA", (40, 20), (255, 0, 0, 255))
    y = from_pil(wide, 10)
    assert y.shape == (1, 3, 10, 10) and torch.allclose(y[0, 0], torch.ones(10, 10))


def test_small_vae_overfits_and_measures_scale(tmp_path):
    images = list(shapes_images(8, 16))
    cfg = VAEConfig.preset("shapes", ch=16, ch_mult=(1, 2), latent_channels=4)
    start = AutoencoderKL(cfg).eval()
    x = torch.stack(images)
    before = psnr(x, start.decode_unscaled(start.posterior(x)[0]).detach().clamp(-1, 1))
    vae = train_vae(images, str(tmp_path), steps=300, batch_size=8, lr=3e-3, config=cfg, log=lambda s: None)
    after = vae.psnr
    assert after > before + 10 and after > 22, (before, after)
    # the scale factor is measured: scaled latents have about unit variance
    assert 0.7 < vae.encode(x).std().item() < 1.4
    assert os.path.exists(tmp_path / "vae.pt") and os.path.exists(tmp_path / "reconstructions.png")
    # the saved checkpoint carries the measured factor
    assert load_vae(str(tmp_path / "vae.pt")).scale_factor == pytest.approx(vae.scale_factor)


def test_save_load_round_trip(tmp_path):
    vae = random_model("shapes", scale_factor=0.5)
    path = str(tmp_path / "ckpt" / "vae.pt")
    save_vae(vae, path)
    assert os.listdir(tmp_path / "ckpt") == ["vae.pt"]  # the .tmp was renamed away
    loaded = load_vae(path)
    assert loaded.config == vae.config and loaded.scale_factor == 0.5
    x = shapes_images(2, 32)
    assert torch.equal(loaded.encode(x), vae.encode(x))
    assert torch.equal(loaded.decode(vae.encode(x)), vae.decode(vae.encode(x)))


def assert_same_model(loaded, vae):
    x = shapes_images(2, 32)
    assert torch.allclose(loaded.encode(x), vae.encode(x), atol=1e-5)
    z = torch.randn(2, vae.latent_channels, 32 // vae.downsample, 32 // vae.downsample)
    assert torch.allclose(loaded.decode(z), vae.decode(z), atol=1e-5)


def write_diffusers_dir(vae, path, old_attention_names=False):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = vae.config
    state = {}
    for k, v in vae.state_dict().items():
        if old_attention_names:
            for new, old in [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                             (".to_out.0.", ".proj_attn.")]:
                k = k.replace(new, old)
        state[k] = v.contiguous()
    save_file(state, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    n = len(cfg.ch_mult)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
                   "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                   "layers_per_block": cfg.num_res_blocks, "latent_channels": cfg.latent_channels,
                   "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scale_factor}, f)


@pytest.mark.parametrize("old_names", [False, True])
def test_load_diffusers_layout(tmp_path, old_names):
    pytest.importorskip("safetensors")
    vae = random_model("sd")
    write_diffusers_dir(vae, str(tmp_path / "vae"), old_attention_names=old_names)
    # a pipeline folder (DIR/vae/) and the VAE folder itself both load
    for spec in [f"sd:{tmp_path}", f'sd:{tmp_path / "vae"}']:
        loaded = load_vae(spec)
        assert loaded.config == vae.config
        assert_same_model(loaded, vae)


def to_ldm_state(vae):
    """Our (diffusers-named) state -> LDM/MAR names: the inverse of the loader's renaming."""
    n = len(vae.config.ch_mult)
    out = {}
    for k, v in vae.state_dict().items():
        parts = k.split(".")
        if k.startswith("encoder.down_blocks."):
            i, kind = parts[2], parts[3]
            head = {"resnets": f"block.{parts[4]}", "attentions": f"attn.{parts[4]}", "downsamplers": "downsample"}[kind]
            k = ".".join(["encoder", "down", i, head] + parts[5:])
        elif k.startswith("decoder.up_blocks."):
            i, kind = n - 1 - int(parts[2]), parts[3]
            head = {"resnets": f"block.{parts[4]}", "upsamplers": "upsample"}[kind]
            k = ".".join(["decoder", "up", str(i), head] + parts[5:])
        k = (k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
              .replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
              .replace("conv_shortcut", "nin_shortcut"))
        if ".attn" in k:  # LDM attention: norm + 1x1 convs q, k, v, proj_out
            k = (k.replace(".group_norm.", ".norm.").replace(".to_q.", ".q.").replace(".to_k.", ".k.")
                  .replace(".to_v.", ".v.").replace(".to_out.0.", ".proj_out."))
            if v.ndim == 2:
                v = v[:, :, None, None]
        out[k] = v.clone()
    return out


def test_load_ldm_mar_layout(tmp_path):
    # MAR KL-16 layout: 5 levels, attention in the last encoder level, 16 latent channels
    vae = random_model("mar-kl16")
    state = to_ldm_state(vae)
    assert "encoder.down.4.attn.1.proj_out.weight" in state and "decoder.up.0.block.2.conv1.weight" in state
    assert state["encoder.mid.attn_1.q.weight"].ndim == 4
    path = str(tmp_path / "kl16.ckpt")
    torch.save({"model": state}, path)
    loaded = load_vae(f"mar:{path}", norm_groups=4)  # GroupNorm groups are not in the weights
    assert loaded.config == VAEConfig.preset("mar-kl16", **TINY)
    assert loaded.scale_factor == 0.2325
    assert_same_model(loaded, vae)
    # top-level state with LDM training leftovers (loss.*) also loads
    torch.save({**state, "loss.logvar": torch.zeros(())}, path)
    assert_same_model(load_vae(f"mar:{path}", norm_groups=4), vae)


def test_ldm_decoder_order_is_reversed():
    state = {"decoder.up.0.block.0.conv1.weight": 0, "decoder.up.2.upsample.conv.weight": 1}
    assert _ldm_to_diffusers(state) == {"decoder.up_blocks.2.resnets.0.conv1.weight": 0,
                                        "decoder.up_blocks.0.upsamplers.0.conv.weight": 1}


def test_mismatched_checkpoint_names_tensors(tmp_path):
    vae = random_model("shapes")
    path = str(tmp_path / "vae.pt")
    save_vae(vae, path)
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    sd["decoder.extra.weight"] = sd.pop("decoder.conv_out.weight")
    sd["quant_conv.bias"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(ValueError) as e:
        load_vae(path)
    msg = str(e.value)
    assert "decoder.conv_out.weight" in msg and "decoder.extra.weight" in msg and "quant_conv.bias" in msg


def test_parity_with_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.3).eval()
    with torch.no_grad():  # randomise everything, norms included, so no tensor can be silently skipped
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(str(tmp_path))
    ours = load_vae(f"sd:{tmp_path}")
    assert ours.config.attn_levels == (2,) and ours.scale_factor == 0.3
    x = shapes_images(2, 32)
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref_img = ref.decode(z).sample.clamp(-1, 1)
        ref_mean = ref.encode(x).latent_dist.mean
    assert (ours.decode(z * 0.3) - ref_img).abs().max() <= 1e-4
    assert (ours.encode(x) / 0.3 - ref_mean).abs().max() <= 1e-4
