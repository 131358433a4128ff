"""
The continuous image tokenizer: a KL autoencoder (LDM / Stable Diffusion "AutoencoderKL").

UniFluid generates VAE latents, not pixels: an image becomes a latent grid,
p x p latent cells become one continuous token. This file holds the VAE, in the module layout of
diffusers' AutoencoderKL so Stable Diffusion weights load by name, plus loaders for LDM/MAR
checkpoints, PIL conversions, and a small trainer for our own dataset.

Train the small shapes VAE on CPU (how long it takes: README, Quickstart):
    python vae.py --dataset shapes --out_dir out/vae
Use it:
    vae = load_vae('out/vae/vae.pt')          # or 'sd:/path/to/sd-vae-ft-mse', 'mar:/path/kl16.ckpt'
    z = vae.encode(images)                    # (B,3,H,W) in [-1,1] -> (B,C,H/f,W/f), ~unit variance
    images = vae.decode(z)                    # -> (B,3,H,W) in [-1,1]
"""

import itertools
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unifluid import read_safetensors, torch_load


@dataclass
class VAEConfig:
    in_channels: int = 3            # image channels (RGB)
    ch: int = 128                   # width of the first level; level i has ch * ch_mult[i] channels
    ch_mult: tuple = (1, 2, 4, 4)   # one entry per level; each level after the first halves H and W
    num_res_blocks: int = 2         # ResNet blocks per encoder level (the decoder uses one more, as LDM)
    latent_channels: int = 4        # channels of the latent grid
    norm_groups: int = 32           # GroupNorm groups (not stored in weights, so part of the config)
    attn_levels: tuple = ()         # encoder levels with attention after each ResNet block (MAR KL-16: the last)
    mid_attention: bool = True      # self-attention in the middle blocks (diffusers mid_block_add_attention)
    scale_factor: float = 0.18215   # latents are multiplied by this so they have about unit variance

    @property
    def downsample(self):
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def preset(cls, name, **overrides):
        presets = {
            # ours: 32 px shapes -> 8x8x4 latents; small enough to train on a 2-core CPU in minutes.
            # scale_factor is a placeholder until train_vae measures it on data.
            # (0.7M params, ~0.18 GFLOP per image forward: widths 16/32/64 at 32/16/8 px)
            "shapes": dict(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, latent_channels=4,
                           norm_groups=8, scale_factor=1.0),
            # Stable Diffusion 1.x (and sd-vae-ft-mse): 8x down, 4 channels
            "sd": dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, latent_channels=4,
                       scale_factor=0.18215),
            # MAR's KL-16 (LDM code): 16x down, 16 channels, attention at the 16x16 level of a 256 px image
            "mar-kl16": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, latent_channels=16,
                             attn_levels=(4,), scale_factor=0.2325),
        }
        if name not in presets:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(presets)}")
        return cls(**{**presets[name], **overrides})


# -----------------------------------------------------------------------------
# building blocks (diffusers names: ResnetBlock2D, Attention, Downsample2D, Upsample2D)

def group_norm(cfg, channels):
    # eps 1e-6 as LDM and diffusers' VAE (not torch's 1e-5): needed for exact parity
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus a (1x1-projected when widths differ) skip. No time embedding."""

    def __init__(self, cfg, in_ch, out_ch):
        super().__init__()
        self.norm1 = group_norm(cfg, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(cfg, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):  # (B, in_ch, H, W) -> (B, out_ch, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions (the VAE only uses it at low resolution)."""

    def __init__(self, cfg, ch):
        super().__init__()
        self.group_norm = group_norm(cfg, ch)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # a list so the name is diffusers' to_out.0

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = F.scaled_dot_product_attention(q, k, v)        # scale 1/sqrt(C): one head of width C
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # LDM pads only right/bottom, so a stride-2 3x3 conv maps H to exactly H/2
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: diffusers' (Attn)DownEncoderBlock2D / UpDecoderBlock2D."""

    def __init__(self, cfg, in_ch, out_ch, n_blocks, attention=False, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, in_ch if i == 0 else out_ch, out_ch)
                                      for i in range(n_blocks)])
        self.attentions = nn.ModuleList([Attention(cfg, out_ch) for _ in range(n_blocks)] if attention else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if down else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if up else [])

    def forward(self, x):
        for i, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions:
                x = self.attentions[i](x)
        for resample in (*self.downsamplers, *self.upsamplers):
            x = resample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, cfg, ch):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cfg, ch, ch), ResnetBlock(cfg, ch, ch)])
        self.attentions = nn.ModuleList([Attention(cfg, ch)] if cfg.mid_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(cfg, widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks,
                  attention=i in cfg.attn_levels, down=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(cfg, widths[-1])
        self.conv_norm_out = group_norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):  # (B, 3, H, W) -> (B, 2C, H/f, W/f)
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # lowest resolution first
        n = len(widths)
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, widths[0])
        # one more ResNet block per level than the encoder, as in LDM
        self.up_blocks = nn.ModuleList([
            Level(cfg, widths[max(i - 1, 0)], widths[i], cfg.num_res_blocks + 1, up=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = group_norm(cfg, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):  # (B, C, h, w) -> (B, 3, h*f, w*f)
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    # the scale factor lives in the config, which save_vae stores next to the weights
    @property
    def scale_factor(self):
        return self.config.scale_factor

    @property
    def latent_channels(self):
        return self.config.latent_channels

    @property
    def downsample(self):
        return self.config.downsample

    def posterior(self, images):
        """Diagonal Gaussian q(z|x): (mean, logvar), each (B, C, H/f, W/f), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # LDM's clamp keeps exp() finite

    def decode_unscaled(self, z):
        """Raw decoder output (no clamp) from unscaled latents: what training backpropagates through."""
        return self.decoder(self.post_quant_conv(z))

    @torch.no_grad()
    def encode(self, images, sample=False, generator=None):
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f) with about unit variance: the posterior
        mean, or with sample=True a draw from the posterior (what MAR trains on; noise from `generator`)."""
        mean, logvar = self.posterior(images)
        if not sample:
            return mean * self.scale_factor
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=generator.device if
                            generator is not None else mean.device).to(mean.device)
        return (mean + noise * torch.exp(0.5 * logvar)) * self.scale_factor

    @torch.no_grad()
    def decode(self, latents):
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        return self.decode_unscaled(latents / self.scale_factor).clamp(-1.0, 1.0)


# -----------------------------------------------------------------------------
# saving and loading: our .pt, diffusers folders, LDM/MAR checkpoints

def save_vae(vae, path):
    """Write {config, state_dict, scale_factor} atomically: a crash mid-write never leaves a torn file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(vae.config).items()}
    state = {k: v.detach().cpu() for k, v in vae.state_dict().items()}
    torch.save({"config": config, "state_dict": state, "scale_factor": vae.scale_factor}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_vae(spec, device="cpu", **overrides):
    """spec: 'PATH.pt' (ours), 'sd:DIR' (diffusers folder) or 'mar:PATH' (LDM/MAR ckpt).
    overrides: VAEConfig fields that weights cannot tell (e.g. norm_groups, scale_factor)."""
    if spec.startswith("sd:"):
        state, cfg = _read_diffusers(spec[3:])
        cfg = {**_infer_config(state), **cfg}
    elif spec.startswith("mar:"):
        ckpt = torch_load(spec[4:])
        state = _ldm_to_diffusers(ckpt.get("model", ckpt.get("state_dict", ckpt)))
        cfg = {**_infer_config(state), "scale_factor": 0.2325}  # MAR's KL-16 factor
    else:
        if not os.path.exists(spec):
            raise FileNotFoundError(f"no VAE at {spec}: put it back, or train one with "
                                    f"`python vae.py --out_dir {os.path.dirname(spec) or '.'}`")
        ckpt = torch_load(spec)
        if not isinstance(ckpt, dict) or "config" not in ckpt:
            raise ValueError(f"{spec!r} is not a save_vae checkpoint; for external weights use "
                             f"'sd:DIR' (diffusers) or 'mar:PATH' (LDM/MAR)")
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
        cfg["scale_factor"] = ckpt["scale_factor"]
        state = ckpt["state_dict"]
    config = VAEConfig(**{**cfg, **overrides})
    vae = AutoencoderKL(config)
    _check_state(vae, state, spec)
    vae.load_state_dict(state)
    return vae.to(device).eval()


def _read_diffusers(path):
    if os.path.isdir(os.path.join(path, "vae")):  # a whole pipeline folder
        path = os.path.join(path, "vae")
    with open(os.path.join(path, "config.json")) as f:
        dcfg = json.load(f)
    if not dcfg.get("use_quant_conv", True) or not dcfg.get("use_post_quant_conv", True):
        raise ValueError(f"{path}: VAEs without quant_conv/post_quant_conv (SD3/Flux) are not supported")
    st_file = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if os.path.exists(st_file):
        state = read_safetensors(st_file)
    else:
        state = torch_load(os.path.join(path, "diffusion_pytorch_model.bin"))
    # older diffusers files name the attention projections query/key/value/proj_attn
    renames = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            k = k.replace(old, new)
        out[k] = v.flatten(1) if ".attentions." in k and v.ndim == 4 else v  # some store 1x1 convs
    cfg = dict(norm_groups=dcfg.get("norm_num_groups", 32), scale_factor=dcfg.get("scaling_factor", 0.18215),
               mid_attention=dcfg.get("mid_block_add_attention", True))
    return out, cfg


def _ldm_to_diffusers(state):
    """Rename an LDM/MAR state dict (encoder.down.N.block.M, mid.attn_1, decoder.up.N ...) to ours."""
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()
             if not k.startswith("loss.")}  # loss.*: LPIPS/discriminator weights saved by LDM training
    n_up = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    rules = [  # (pattern, replacement); applied in order
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.attn\.", r"encoder.down_blocks.\1.attentions."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        # LDM keeps decoder.up in resolution order (up.0 = full resolution); diffusers runs
        # up_blocks in execution order (up_blocks.0 = lowest resolution): reverse the index
        (r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0."),
        (r"\.mid\.block_1\.", ".mid_block.resnets.0."), (r"\.mid\.block_2\.", ".mid_block.resnets.1."),
        (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
        (r"\.norm_out\.", ".conv_norm_out."), (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."), (r"(attentions\.\d+)\.q\.", r"\1.to_q."),
        (r"(attentions\.\d+)\.k\.", r"\1.to_k."), (r"(attentions\.\d+)\.v\.", r"\1.to_v."),
        (r"(attentions\.\d+)\.proj_out\.", r"\1.to_out.0."),
    ]
    out = {}
    for k, v in state.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        # LDM attention projections are 1x1 convs (C, C, 1, 1); ours are Linear (C, C)
        out[k] = v.flatten(1) if ".attentions." in k and v.ndim == 4 else v
    return out


def _infer_config(state):
    """Read the architecture off tensor shapes (diffusers names), so external files need no config."""
    def get(name):
        if name not in state:
            raise ValueError(f"cannot infer the VAE architecture: checkpoint has no tensor {name!r}")
        return state[name]
    if "encoder.conv_in.weight" not in state:
        return {}  # not a VAE state at all; _check_state will list what is missing
    ch = get("encoder.conv_in.weight").shape[0]
    n = len({k.split(".")[2] for k in state if k.startswith("encoder.down_blocks.")})
    mult = tuple(get(f"encoder.down_blocks.{i}.resnets.0.conv1.weight").shape[0] // ch for i in range(n))
    n_res = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    return dict(in_channels=get("encoder.conv_in.weight").shape[1], ch=ch, ch_mult=mult, num_res_blocks=n_res,
                latent_channels=get("post_quant_conv.weight").shape[0],
                attn_levels=tuple(i for i in range(n) if f"encoder.down_blocks.{i}.attentions.0.to_q.weight" in state),
                mid_attention="encoder.mid_block.attentions.0.to_q.weight" in state)


def _check_state(model, state, source):
    """Raise one ValueError naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        msg = [f"checkpoint {source!r} does not match the VAE architecture ({model.config})"]
        for title, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if names:
                msg.append(f"{len(names)} {title} tensors: " + ", ".join(names[:20]) + (" ..." if len(names) > 20 else ""))
        raise ValueError("\n".join(msg))


# -----------------------------------------------------------------------------
# PIL conversions: images in [-1, 1] <-> PIL (data.plots.save_grid writes grids of them)

def to_pil(images):
    """(B, 3, H, W) or (3, H, W) float in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image
    images = images.detach().float().cpu()
    images = images[None] if images.ndim == 3 else images
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def from_pil(pil_images, size):
    """PIL image(s) -> (B, 3, size, size) in [-1, 1]: RGB, shorter side resized to size, center crop."""
    import numpy as np
    from PIL import Image
    pil_images = [pil_images] if isinstance(pil_images, Image.Image) else pil_images
    out = []
    for im in pil_images:
        im = im.convert("RGB")
        s = size / min(im.size)
        w, h = max(size, round(im.width * s)), max(size, round(im.height * s))
        im = im.resize((w, h), Image.BICUBIC)
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out)


@torch.no_grad()
def save_reconstructions(vae, images, path):
    """PNG with originals on top and their reconstructions below: the first thing to look at."""
    from data.plots import save_grid
    device = next(vae.parameters()).device
    save_grid(torch.cat([images, vae.decode(vae.encode(images.to(device))).cpu()]), path, cols=len(images))


# -----------------------------------------------------------------------------
# training our own VAE

def image_batches(dataset, batch_size):
    """Endless (B, 3, H, W) batches from `dataset`, re-iterated when it runs out. Items may be image
    tensors (3, H, W) or data/ example dicts, whose unused image slot is zeros: we take
    'output_image' for the generation tasks (t2i, edit) and 'input_image' for the others."""
    batch = []
    while True:
        n_seen = 0
        for item in dataset:
            n_seen += 1
            img = item
            if isinstance(item, dict):
                img = item["output_image" if item.get("task", "t2i") in ("t2i", "edit") else "input_image"]
            batch.append(img)
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
        if n_seen == 0:
            raise ValueError("train_vae: the dataset yielded no images")


def psnr(images, recons):
    """Mean per-image PSNR in dB, with pixels in [0, 1]."""
    mse = ((images - recons) / 2).pow(2).flatten(1).mean(1)  # [-1,1] -> [0,1] halves the error
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


@torch.no_grad()
def evaluate_psnr(vae, batches, device):
    """PSNR of decode(encode(x)) through the public API (posterior mean, scale factor, clamp)."""
    vae.eval()
    scores = [psnr(x, vae.decode(vae.encode(x.to(device))).cpu()) for x in batches]
    vae.train()
    return sum(scores) / len(scores)


def train_vae(dataset, out_dir, steps=800, batch_size=32, lr=2e-3, device="cpu", log=print,
              config=None, eval_dataset=None, kl_weight=1e-6, seed=0, eval_every=250):
    """Train a VAE on `dataset` (see image_batches), measure its scale factor, save out_dir/vae.pt."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    batches = image_batches(dataset, batch_size)
    first = next(batches)
    config = config or VAEConfig.preset("shapes")
    vae = AutoencoderKL(config).to(device).train()
    n_params = sum(p.numel() for p in vae.parameters())
    log(f"vae: {n_params / 1e6:.2f}M params, images {tuple(first.shape[1:])} -> latents "
        f"{(config.latent_channels, first.shape[2] // config.downsample, first.shape[3] // config.downsample)}")
    # held-out images when given; otherwise we can only report PSNR on training images
    eval_batches = list(itertools.islice(image_batches(eval_dataset, batch_size), max(1, 256 // batch_size))) \
        if eval_dataset is not None else [first]
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(200, steps // 20))

    from tqdm import tqdm
    t0 = time.time()
    pbar = tqdm(range(steps), desc="vae", dynamic_ncols=True)
    for step in pbar:
        # linear warmup, then cosine decay to 10% of lr (the last steps polish the reconstruction)
        frac = max(0.0, (step - warmup) / max(1, steps - warmup))
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        x = (first if step == 0 else next(batches)).to(device)  # (B, 3, H, W)
        mean, logvar = vae.posterior(x)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)  # reparameterised sample
        recon = vae.decode_unscaled(z)
        # L1 for sharp edges, MSE to push PSNR; the KL is summed per image and divided by the pixel
        # count, which makes kl_weight the same number as LDM's (whose losses are per-image sums)
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean() / x[0].numel()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            pbar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.3g}")
        if eval_every and step > 0 and step % eval_every == 0:  # watch quality while it trains
            # (the scale factor is not measured yet, but PSNR of decode(encode(x)) does not depend on it)
            pbar.write(f"step {step}: PSNR {evaluate_psnr(vae, eval_batches, device):.2f} dB, "
                       f"{time.time() - t0:.0f}s")
            save_reconstructions(vae, eval_batches[0][:8], os.path.join(out_dir, "reconstructions.png"))

    # SD's recipe: scale latents by 1/std measured on training data, so the generator sees ~unit variance
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.posterior(next(batches).to(device))[0].cpu() for _ in range(8)])
    config.scale_factor = 1.0 / latents.std().item()
    score = evaluate_psnr(vae, eval_batches, device)
    save_reconstructions(vae, eval_batches[0][:8], os.path.join(out_dir, "reconstructions.png"))
    save_vae(vae, os.path.join(out_dir, "vae.pt"))
    which = "held-out" if eval_dataset is not None else "train"
    log(f"vae: {steps} steps in {time.time() - t0:.0f}s, {which} PSNR {score:.2f} dB, "
        f"scale_factor {config.scale_factor:.4f}, saved {os.path.join(out_dir, 'vae.pt')}")
    vae.psnr = score  # held-out (or train) PSNR, for the caller's log
    return vae


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Train the VAE that turns images into UniFluid tokens; or, with "
                                            "--encode, encode a real dataset once into latents for "
                                            "train.py --dataset latents --data_dir OUT_DIR (data/latents.py).")
    p.add_argument("--dataset", default="shapes", help="a dataset name known to data.build_dataset")
    p.add_argument("--data_dir", default=None, help="where the dataset lives (not needed for shapes)")
    p.add_argument("--out_dir", default="out/vae")
    p.add_argument("--preset", default="shapes", help="VAEConfig preset to train")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=float, default=0.02, help="share of a real dataset without a validation split "
                   "held out by key, as train.py --holdout: use the same value, so the VAE never sees its images")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default). On a CPU shared with other jobs, "
                        "1 avoids OpenMP threads spin-waiting on each other (5-10x slower steps)")
    g = p.add_argument_group("--encode: pre-encode a real dataset (as MAR does), instead of training")
    g.add_argument("--encode", action="store_true", help="write OUT_DIR/{split}-*.pt latent shards + meta.json")
    g.add_argument("--vae", default="", help="the VAE to encode with: our vae.pt, sd:DIR or mar:PATH")
    g.add_argument("--split", default="train", help="which split of the dataset to encode")
    g.add_argument("--shard_size", type=int, default=2000, help="images per latent shard")
    g.add_argument("--latent_dtype", choices=["float16", "float32"], default="float16")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.encode:
        return encode_main(args, p)

    from data import build_dataset  # lazy: vae.py itself must not need data/
    # t2i examples only: every one carries a real image (in other tasks one image slot is zeros)
    kw = dict(data_dir=args.data_dir, resolution=args.resolution, tasks={"t2i": 1.0}, holdout=args.holdout)
    t0 = time.time()
    try:                            # a dataset that cannot be read is one sentence, here as in train.py
        train = build_dataset(args.dataset, split="train", seed=args.seed, **kw)
        from data.imagetext import EmptySplit
        try:                        # shapes: distinct seeds and unseen pairs; real data: its held-out part
            held_out = build_dataset(args.dataset, split="val", seed=args.seed, **kw)
            next(iter(held_out))
        except (FileNotFoundError, EmptySplit):   # none (--holdout 0, or a tiny dataset): the training split
            held_out = build_dataset(args.dataset, split="train", seed=args.seed + 1, **kw)
        vae = train_vae(train, args.out_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        device=args.device, config=VAEConfig.preset(args.preset), eval_dataset=held_out,
                        kl_weight=args.kl_weight, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"vae.py: error: {e}") from None
    print(json.dumps({"result": "vae", "psnr_db": round(vae.psnr, 2), "seconds": round(time.time() - t0, 1),
                      "scale_factor": round(vae.scale_factor, 5), "steps": args.steps}))


def encode_main(args, parser):
    from data.latents import encode_dataset
    if not args.vae:
        parser.error("--encode needs --vae: the VAE train.py will decode with (our vae.pt, sd:DIR or mar:PATH)")
    spec = args.vae if ":" in args.vae[:4] else os.path.abspath(args.vae)
    t0 = time.time()
    try:
        n = encode_dataset(load_vae(spec, args.device), spec, args.dataset, args.data_dir, args.out_dir, args.split,
                           args.resolution, args.batch_size, args.shard_size, getattr(torch, args.latent_dtype),
                           args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"vae.py: error: {e}") from None
    print(json.dumps({"result": "encode", "samples": n, "out_dir": args.out_dir,
                      "seconds": round(time.time() - t0, 1)}))
    return n


if __name__ == "__main__":
    main()
