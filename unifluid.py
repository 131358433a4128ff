"""
UniFluid in one file (Fan et al., "Unified Autoregressive Visual Generation and Understanding with
Continuous Tokens", arXiv 2503.13436).

One Gemma-like decoder reads three layouts:

    generation     <bos> text… <boi> [img_1 … img_N]          img slots: VAE latent patch or [MASK]
    understanding  [und_1 … und_M] <bos> prompt… <sep> answer… <eos>
    editing        [und_1 … und_M] <bos> instruction… <boi> [img_1 … img_N]

Text positions end in the tied softmax head (cross entropy). Image positions end in a small per-token
diffusion head (MAR) that models the continuous token. One loss: w * L_image + (1 - w) * L_text.

Read top to bottom, the method: 1. config and presets -> 2. decoder -> 3. attention masks ->
4. understanding ViT -> 5. image tokens -> 6. random-order masking -> 7. diffusion head (loss and
sampler) -> 8. UniFluid (batch layout, joint loss) -> 9. generation. Then the appendix, what belongs to
the model but is not the method: A. tokenizers, B. Hugging Face Gemma / SigLIP config and weight-name
maps, C. FLOPs, D. checkpoints and weight files. Nothing here reads datasets or the command line.
"""
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Config and presets


@dataclass
class Config:
    # decoder (Gemma-like)
    vocab_size: int = 264          # set from the tokenizer; 264 = byte tokenizer
    n_layer: int = 4               # transformer blocks
    d_model: int = 192             # residual width
    n_head: int = 4                # query heads
    n_kv_head: int = 2             # key/value heads (grouped-query attention)
    head_dim: int = 48             # per-head width (Gemma decouples it from d_model)
    d_ff: int = 768                # GeGLU hidden width
    rope_base: float = 10_000.0    # RoPE base for global layers
    rope_local_base: float = 10_000.0  # RoPE base for sliding-window layers (Gemma-3: 10k, global 1M)
    query_scale: float = 0.0       # queries are scaled by query_scale**-0.5; 0 -> head_dim (Gemma-2: 256)
    qk_norm: bool = True           # Gemma-3 RMSNorm on queries and keys (keeps attention flash-friendly)
    sandwich_norm: bool = True     # Gemma-2/3 post-attention and post-MLP norms; False = Gemma-1
    attn_softcap: float = 0.0      # Gemma-2 tanh soft-capping of attention logits (50); 0 = off
    final_softcap: float = 0.0     # Gemma-2 soft-capping of output logits (30); 0 = off
    sliding_window: int = 0        # window of local layers; 0 = every layer global
    global_every: int = 1          # layer i is global iff (i + 1) % global_every == 0 (Gemma-2: 2, Gemma-3: 6)
    layer_pattern: str = ""        # per-layer "G" global / "L" local, overrides global_every ("" = use it)
    norm_eps: float = 1e-6         # RMSNorm epsilon (HF rms_norm_eps)
    max_text_len: int = 32         # longest prompt/answer in tokens (longer ones are truncated)
    # understanding encoder (SigLIP-layout ViT)
    image_size: int = 32           # pixels of the images the ViT reads
    vit_patch: int = 8             # ViT patch size -> (image_size / vit_patch)^2 ViT tokens
    vit_pool: int = 1              # k x k neighbouring ViT outputs concatenated into one und slot
                                   # (pixel shuffle, as Idefics3 / InternVL): fine patches, few slots
    vit_width: int = 128
    vit_layers: int = 2
    vit_heads: int = 4
    vit_mlp: int = 512
    vit_stem: int = 0              # 3x3 stride-2 convolutions before the patch embedding (Xiao et al. 2021,
                                   # "Early convolutions help transformers see better"); 0 = SigLIP's linear patches
    # generated image tokens (VAE latents)
    latent_size: int = 8           # latent grid side (image_size / VAE downsampling)
    latent_channels: int = 4       # VAE latent channels
    patch_size: int = 2            # p x p latent cells form one token -> token_dim = p*p*C
    order: str = "random"          # "random" (MAR masking, bidirectional block) or "raster" (causal AR)
    mask_ratio_min: float = 0.7    # training mask ratio ~ normal(1, mask_ratio_std) truncated to
    mask_ratio_std: float = 0.25   # [mask_ratio_min, 1] (MAR: 0.7, 0.25; std 1, min 0: near uniform)
    # diffusion head (MAR's SimpleMLPAdaLN)
    head_width: int = 256
    head_depth: int = 3
    diffusion_steps: int = 1000    # training timesteps of the cosine schedule
    diffusion_batch_mul: int = 4   # each z is reused with 4 independent noises (the head is cheap)
    prediction: str = "eps"        # what the head predicts: "eps" (MAR, DDPM), "v" (Salimans & Ho), or "flow":
                                   # the velocity of a rectified flow in place of DDPM (FlowMatching, SD3)
    learn_sigma: bool = False      # also learn the sampling variance with the VLB term (MAR, improved DDPM)
    t_sampling: str = "uniform"    # training timesteps: "uniform" (DDPM, MAR) or "logit_normal" (t/T = sigmoid of
                                   # N(0, 1): more steps at mid noise, as Stable Diffusion 3)
    snr_gamma: float = 0.0         # min-SNR-gamma loss weighting (Hang et al. 2023; they use 5); 0 = off (MAR)
    repa_weight: float = 0.0       # representation alignment (REPA, Yu et al. 2024; they use 0.5): adds this times
    repa_layer: int = 2            # 1 - cos between an MLP of the gen slots' states after repa_layer decoder blocks
                                   # and the ViT's features of the same image (no gradient into them); 0 = off
    # a MAR detail, screened at small scale (docs/log.md)
    img_input_ln: bool = False     # LayerNorm on the gen-slot inputs (MAR's z_proj_ln; on in every preset but tiny):
                                   # without it image inputs are small next to the sqrt(d)-scaled text embeddings,
                                   # and the trunk barely uses the tokens already drawn
    # training-time behaviour
    image_weight: float = 0.9      # w in  w * L_image + (1 - w) * L_text  (README, Training)
    text_loss: str = "token"       # L_text averaged over answer tokens ("token": a caption outweighs a one-word
                                   # answer by its length) or over rows ("row": each row's token mean, then the mean)
    cfg_dropout: float = 0.1       # probability that a t2i prompt is replaced by the empty prompt
    dropout: float = 0.0           # residual dropout in the decoder blocks (training only)

    @property
    def num_image_tokens(self):    # N generated slots
        return (self.latent_size // self.patch_size) ** 2

    @property
    def token_dim(self):           # dimension of one continuous image token
        return self.patch_size * self.patch_size * self.latent_channels

    @property
    def num_vit_tokens(self):      # patches the ViT reads
        return (self.image_size // self.vit_patch) ** 2

    @property
    def num_und_tokens(self):      # M understanding slots in the decoder
        return (self.image_size // self.vit_patch // self.vit_pool) ** 2

    def layer_is_global(self, i):
        if self.sliding_window <= 0:
            return True
        return self.layer_pattern[i] == "G" if self.layer_pattern else (i + 1) % self.global_every == 0

    @staticmethod
    def preset(name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        return replace(Config(**PRESETS[name]), **overrides)

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        """The Config a checkpoint saved (to_dict). Fields that earlier versions had and this one dropped
        are ignored when the model they describe is this one (init only chose the initial weights);
        ValueError, one sentence, when it is not. An unknown field is a TypeError (another version)."""
        d = dict(d)
        d.pop("init", None)
        if d.pop("head_pos_embed", False):
            raise ValueError("the checkpoint was trained with head_pos_embed, an option this version of "
                             "unifluid.py no longer has; load it with the version that wrote it")
        return Config(**d)


PRESETS = {
    # unit tests: a few hundred thousand parameters
    "tiny": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_ff=256, vit_width=32,
                 vit_layers=1, vit_heads=2, vit_mlp=64, head_width=64, head_depth=2, max_text_len=16),
    # the CPU quickstart: 16 tokens of 16 dims, the width that did best at equal CPU time (docs/log.md).
    # Mask ratios near uniform on [0, 1] instead of MAR's [0.7, 1]: with 16 slots, MAR's ratios never show
    # the model more than 4 known tokens, while sampling conditions on up to 15. A flow head: at this size
    # and budget it generates better than v-prediction, which beat eps, and more so trained on SD3's
    # logit-normal timesteps (which lost with the v head). All were screened (docs/log.md).
    "small": dict(d_model=96, d_ff=384, head_dim=24, head_width=128, img_input_ln=True, prediction="flow",
                  t_sampling="logit_normal", mask_ratio_min=0.0, mask_ratio_std=1.0),
    # one GPU, a few hundred M parameters, 64 px images
    "base": dict(n_layer=16, d_model=1024, n_head=8, n_kv_head=4, head_dim=128, d_ff=4096,
                 image_size=64, vit_patch=8, vit_width=384, vit_layers=6, vit_heads=6, vit_mlp=1536,
                 latent_size=16, head_width=1024, head_depth=6, max_text_len=48, img_input_ln=True),
    # real Gemma shapes (text decoder exactly as released; image parts sized like MAR-B)
    "gemma2-2b": dict(vocab_size=256_000, n_layer=26, d_model=2304, n_head=8, n_kv_head=4, head_dim=256,
                      d_ff=9216, query_scale=256, qk_norm=False, attn_softcap=50.0, final_softcap=30.0,
                      sliding_window=4096, global_every=2, image_size=256, vit_patch=16, vit_width=768,
                      vit_layers=12, vit_heads=12, vit_mlp=3072, latent_size=16, latent_channels=16,
                      patch_size=1, head_width=1024, head_depth=6, max_text_len=128, img_input_ln=True),
    "gemma3-1b": dict(vocab_size=262_144, n_layer=26, d_model=1152, n_head=4, n_kv_head=1, head_dim=256,
                      d_ff=6912, query_scale=256, rope_base=1_000_000.0, sliding_window=512,
                      global_every=6, image_size=256, vit_patch=16, vit_width=768, vit_layers=12,
                      vit_heads=12, vit_mlp=3072, latent_size=16, latent_channels=16, patch_size=1,
                      head_width=1024, head_depth=6, max_text_len=128, img_input_ln=True),
}

# the special tokens every tokenizer (appendix A) numbers first: the layouts at the top of this file use them
SPECIALS = ["<pad>", "<bos>", "<eos>", "<boi>", "<eoi>", "<sep>", "<unused0>", "<unused1>"]
PAD, BOS, EOS, BOI, EOI, SEP = range(6)
N_SPECIAL = len(SPECIALS)

# -----------------------------------------------------------------------------
# 2. The Gemma-like decoder


class RMSNorm(nn.Module):
    """Gemma: computed in fp32, weight stored as an offset from 1 (init 0)."""
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


def rope(x, pos, base):
    """Rotary embedding, half-split layout (Gemma/HF): x (B, H, T, hd), pos (B, T)."""
    hd = x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd))
    ang = pos.float()[:, None, :, None] * inv                      # (B, 1, T, hd/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).type_as(x)


def take_rows(x, rows):
    """x (B, T, D), rows (B, k) positions -> (B, k, D)."""
    return x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))


class KVCache:
    """Pre-allocated keys/values for every layer, written in place by position (gemma_pytorch)."""
    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps), RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.rope_base = cfg.rope_base if cfg.layer_is_global(layer) else cfg.rope_local_base
        self.scale = (cfg.query_scale or cfg.head_dim) ** -0.5

    def forward(self, x, pos, mask, cache=None, start=0, rows=None):
        """rows (B, k), optional: queries only at these positions of x (keys and values at all of them)."""
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        xq, pos_q = x, pos
        if rows is not None:                                           # the mask's query rows follow them
            if callable(mask):
                raise ValueError("rows= needs a tensor attention mask (SDPA), not a FlexAttention block mask")
            xq, pos_q = take_rows(x, rows), pos.gather(1, rows)
            mask = take_rows(mask.expand(B, -1, -1, -1)[:, 0], rows)[:, None]   # (B, 1, k, S)
        q = self.q_proj(xq).view(B, xq.shape[1], -1, hd).transpose(1, 2)  # (B, H, Tq, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)          # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q, pos_q, self.rope_base), rope(k, pos, self.rope_base)
        if cache is not None:                                          # write in place, read the prefix
            cache.k[self.layer][:, :, start:start + T] = k
            cache.v[self.layer][:, :, start:start + T] = v
            k, v = cache.k[self.layer][:, :, :start + T], cache.v[self.layer][:, :, :start + T]
        if callable(mask):                                             # FlexAttention block mask (GPU)
            y = mask(q, k, v, self.scale)
        elif self.cfg.attn_softcap > 0:                                # Gemma-2 soft-capping: no fused kernel
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            att = (q @ k.transpose(-1, -2)) * self.scale
            att = torch.tanh(att / self.cfg.attn_softcap) * self.cfg.attn_softcap
            att = att.masked_fill(~mask, float("-inf")).softmax(-1, dtype=torch.float32).type_as(q)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
        return self.o_proj(y.transpose(1, 2).reshape(B, q.shape[2], -1))


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), no biases."""
    def __init__(self, d, d_ff):
        super().__init__()
        self.gate_proj = nn.Linear(d, d_ff, bias=False)
        self.up_proj = nn.Linear(d, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    """Gemma-2/3 sandwich: x + post_norm(attn(pre_norm(x))), same around the MLP."""
    def __init__(self, cfg, layer):
        super().__init__()
        sandwich = (lambda: RMSNorm(cfg.d_model, cfg.norm_eps)) if cfg.sandwich_norm else nn.Identity
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = sandwich()    # Gemma-2/3 meaning (Gemma-1 uses the name pre-MLP)
        self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.d_ff)
        self.post_feedforward_layernorm = sandwich()
        self.is_global, self.dropout = cfg.layer_is_global(layer), cfg.dropout

    def forward(self, x, pos, masks, cache=None, start=0, rows=None):
        mask = masks["global" if self.is_global else "local"]
        drop = lambda y: F.dropout(y, self.dropout, self.training) if self.dropout > 0 else y
        a = self.self_attn(self.input_layernorm(x), pos, mask, cache, start, rows)
        x = (x if rows is None else take_rows(x, rows)) + drop(self.post_attention_layernorm(a))
        return x + drop(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))


class Gemma(nn.Module):
    """Names follow Hugging Face's Gemma (model.embed_tokens, model.layers.N..., model.norm)."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.checkpointing = False     # activation checkpointing (train.py --grad_checkpoint)

    def embed(self, ids):              # Gemma multiplies input embeddings by sqrt(d) (in the compute dtype)
        e = self.embed_tokens(ids)
        return e * torch.tensor(self.cfg.d_model ** 0.5, dtype=e.dtype)

    def forward(self, x, pos, masks, cache=None, start=0, keep=0, rows=None):
        """-> the final states; with keep = k > 0, also the states after the first k blocks (REPA). rows (B, k),
        optional: the final states only at these positions of x, (B, k, D); the last block computes only them
        (sampling needs the states of the slots it reveals; nanoGPT's generate does the same for its lm_head)."""
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, pos, masks, use_reentrant=False)
            else:
                x = layer(x, pos, masks, cache, start, rows if i == len(self.layers) - 1 else None)
            if i + 1 == keep:
                kept = x
        return (self.norm(x), kept) if keep else self.norm(x)

    def logits(self, h):               # tied head, optional Gemma-2 final soft-capping
        logits = h @ self.embed_tokens.weight.t()
        c = self.cfg.final_softcap
        return torch.tanh(logits / c) * c if c > 0 else logits

# -----------------------------------------------------------------------------
# 3. Attention masks from per-position kinds (so padded, mixed-task batches work)

KIND_PAD, KIND_TEXT, KIND_GEN, KIND_UND = 0, 1, 2, 3


def may_attend(kind_q, kind_k, q, k, order="random", window=0):
    """The one attention rule, True where query position q may attend key position k (kinds and
    positions broadcast): causal everywhere, plus both ways inside an image block (the und slots, or
    the gen slots in random order: each kind forms one contiguous block per row, so "same block" is
    "same bidirectional kind"); padding is never attended; a position always sees itself (pad rows too).
    attention_mask evaluates it over (T, T); FlexAttention calls it per (q, k) pair."""
    bidir = (kind_q == KIND_UND) | (kind_q == KIND_GEN) if order == "random" else kind_q == KIND_UND
    ok = ((q >= k) | (bidir & (kind_k == kind_q))) & (kind_k != KIND_PAD)
    if window > 0:                     # sliding-window (local) layers
        ok = ok & (q - k < window) & (k - q < window)
    return ok | (q == k)


def attention_mask(kind, order="random", window=0):
    """(B, 1, T, T) bool, True = query may attend key (SDPA)."""
    i = torch.arange(kind.shape[1], device=kind.device)
    return may_attend(kind[:, :, None], kind[:, None, :], i[:, None], i[None, :], order, window).unsqueeze(1)


def flex_attention_fn(kind, order="random", window=0):
    """The same rule as a FlexAttention block mask (GPU): blocks that are fully masked are skipped and
    no (B, T, T) tensor is materialised. Returns attn(q, k, v, scale)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, T = kind.shape
    mask_mod = lambda b, h, q, k: may_attend(kind[b, q], kind[b, k], q, k, order, window)
    block_mask = create_block_mask(mask_mod, B, None, T, T, device=kind.device)
    return lambda q, k, v, scale: flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])


def positions(kind):
    """RoPE positions: the count of real (non-pad) tokens before each position."""
    valid = (kind != KIND_PAD).long()
    return torch.cumsum(valid, 1) - valid

# -----------------------------------------------------------------------------
# 4. Understanding encoder: a SigLIP-layout ViT (names follow HF SiglipVisionModel) + projector


class ViTLayer(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, n, nn.Linear(d, d))
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        B, T, D = x.shape
        a, h = self.self_attn, self.layer_norm1(x)
        q, k, v = (p(h).view(B, T, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))


class VisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, n, self.pool = cfg.vit_width, cfg.num_vit_tokens, cfg.vit_pool
        self.embeddings, c, stem = nn.Module(), 3, []
        if cfg.vit_patch % 2 ** cfg.vit_stem:
            raise ValueError(f"vit_stem={cfg.vit_stem} halves the image {cfg.vit_stem} times, which vit_patch="
                             f"{cfg.vit_patch} must allow: choose vit_patch divisible by {2 ** cfg.vit_stem}")
        for i in range(cfg.vit_stem):  # widths d/2^k, ..., d/2; each halves the side
            stem += [nn.Conv2d(c, d >> (cfg.vit_stem - i), 3, stride=2, padding=1), nn.GELU()]
            c = d >> (cfg.vit_stem - i)
        self.embeddings.stem = nn.Sequential(*stem)        # no weights (the identity) when vit_stem = 0
        p = cfg.vit_patch >> cfg.vit_stem                   # what is left of a patch after the stem
        self.embeddings.patch_embedding = nn.Conv2d(c, d, p, stride=p)
        self.embeddings.position_embedding = nn.Embedding(n, d)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(ViTLayer(d, cfg.vit_heads, cfg.vit_mlp) for _ in range(cfg.vit_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, images):         # (B, 3, H, W) in [-1, 1] -> (B, M, vit_width * vit_pool^2)
        x = self.embeddings.patch_embedding(self.embeddings.stem(images))
        B, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2) + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        x, k = self.post_layernorm(x), self.pool
        if k > 1:                      # pixel shuffle: each k x k block of outputs becomes one slot
            x = x.view(B, h // k, k, w // k, k, d).permute(0, 1, 3, 2, 4, 5).reshape(B, (h // k) * (w // k), k * k * d)
        return x

# -----------------------------------------------------------------------------
# 5. Continuous image tokens: VAE latent grid <-> sequence of p*p*C tokens


def patchify(latents, p):
    """(B, C, h, w) -> (B, h/p * w/p, p*p*C), raster order of patches."""
    B, C, h, w = latents.shape
    x = latents.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (h // p) * (w // p), p * p * C)


def unpatchify(tokens, p, C):
    B, N, _ = tokens.shape
    s = int(math.isqrt(N))
    x = tokens.reshape(B, s, s, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, s * p, s * p)

# -----------------------------------------------------------------------------
# 6. Random-order masking (MAR) and the raster-order ablation


def sample_mask_ratio(generator=None, device="cpu", low=0.7, std=0.25):
    """Truncated normal centred at 1.0, on [low, 1.0] (MAR: low 0.7, std 0.25), one ratio per step.
    Drawn by inverting the normal CDF on [cdf(low), cdf(1)], so it stays a tensor: no loop, no host sync."""
    lo = torch.special.ndtr(torch.tensor((low - 1.0) / std, device=device))
    u = lo + (0.5 - lo) * torch.rand((), generator=generator, device=device)
    return (1.0 + std * torch.special.ndtri(u)).clamp(low, 1.0)


def random_orders(B, N, generator=None, device="cpu"):
    return torch.argsort(torch.rand(B, N, generator=generator, device=device), dim=1)


def mask_by_order(num_masked, orders):
    """Mask (True) the first num_masked slots of each permutation (num_masked: int or 0-d tensor)."""
    ranks = torch.arange(orders.shape[1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter_(1, orders, ranks) < num_masked     # slot -> its place in the order


def mean_mask_ratio(low=0.7, std=0.25):
    """Mean of sample_mask_ratio: a normal (1, std) truncated to [low, 1] (MAR's: 0.867)."""
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    a = (low - 1) / std
    return 1 + std * (pdf(a) - pdf(0)) / (cdf(0) - cdf(a))


def random_masking(B, N, generator=None, device="cpu", low=0.7, std=0.25):
    """Training mask: per example a random permutation, per step a ratio in [low, 1] (at least one slot)."""
    num_masked = torch.ceil(N * sample_mask_ratio(generator, device, low, std)).clamp(min=1)
    return mask_by_order(num_masked, random_orders(B, N, generator, device))

# -----------------------------------------------------------------------------
# 7. The diffusion head (MAR's diffloss.py): a per-token MLP conditioned on the decoder output z


def timestep_embedding(t, dim, max_period=10_000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.cos(), ang.sin()], -1)


class ResBlock(nn.Module):
    """LayerNorm -> AdaLN shift/scale -> Linear -> SiLU -> Linear -> gated residual."""
    def __init__(self, w):
        super().__init__()
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 3 * w))

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, -1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionHead(nn.Module):
    """The MLP that predicts the noise of one token. Its interface: token_dim, condition(z) (the decoder
    output embedded once per token), time(t), forward(x_t, t, c) = denoise(x_t, time(t) + c)."""
    def __init__(self, token_dim, cond_dim, width, depth, out_dim=None):
        super().__init__()
        self.token_dim = token_dim     # out_dim = 2 * token_dim with a learned variance: (eps, variance mix)
        self.t_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.c_embed = nn.Linear(cond_dim, width)
        self.x_in = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, out_dim or token_dim)
        for m in [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]:
            nn.init.zeros_(m.weight)   # zero-init modulation and output: the head starts as "predict 0"
            nn.init.zeros_(m.bias)

    def condition(self, z):            # decoder output (n, D) -> (n, width); the same at every timestep
        return self.c_embed(z)

    def time(self, t):                 # timesteps (n,) -> (n, width), added to the condition
        return self.t_embed(timestep_embedding(t, 256))

    def forward(self, x, t, c):        # noisy token (n, Dt), timestep (n,) or (1,), condition(z) (n, width) -> eps
        return self.denoise(x, self.time(t) + c)

    def denoise(self, x, c):           # c = condition(z) + time(t): the sampler embeds its timesteps once
        h = self.x_in(x)
        for b in self.blocks:
            h = b(h, c)
        shift, scale = self.final_ada(c).chunk(2, -1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


def cosine_alphas_cumprod(T, s=0.008):
    """Improved-DDPM cosine schedule (Nichol & Dhariwal), as in MAR's create_diffusion."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of a Gaussian integrated over x's bin of width 2/255 (data in [-1, 1], the ends open), per
    element: the t = 0 term of improved DDPM's bound, which MAR keeps for its latent tokens unchanged."""
    def cdf(v):                                  # improved DDPM's tanh approximation of the normal CDF
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    return torch.where(x < -0.999, cdf_plus.clamp(min=1e-12).log(),
                       torch.where(x > 0.999, (1 - cdf_min).clamp(min=1e-12).log(),
                                   (cdf_plus - cdf_min).clamp(min=1e-12).log()))


def weighted_tokens(weight, mul, *xs):
    """The tokens a diffusion loss trains on, each of xs (n * mul, ...) being mul copies of n tokens and
    weight (n,) 0/1 or None. -> (xs, weight): eager, only the weighted tokens are kept (and weight is None);
    under torch.compile all of them, weight repeated mul times, so that no shape depends on the data. Both
    draw the same random numbers and give the same loss."""
    if weight is None:
        return xs, None
    weight = weight.float().repeat(mul)
    if torch.compiler.is_compiling():
        return xs, weight
    keep = weight > 0
    return tuple(x[keep] for x in xs), None


SAMPLERS = ("ddpm", "ddim")   # how a head draws a token: ancestral or deterministic (GaussianDiffusion.sample)


def guidance_rows(z, temperature, guidance, sampler):
    """What both heads' sample() check and set up first: -> (guided, the number of tokens to draw, guidance
    as a float or an (n, 1) tensor). ValueError for an unknown sampler or a temperature ddim cannot apply."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: choose ddpm or ddim")
    if sampler == "ddim" and temperature != 1.0:
        raise ValueError(f"the ddim sampler adds no noise for a temperature to scale (got {temperature}): "
                         f"use temperature 1 or the ddpm sampler")
    guided = guidance is not None
    if guided and torch.is_tensor(guidance):
        guidance = guidance.to(z.device, torch.float32).view(-1, 1)
    return guided, z.shape[0] // 2 if guided else z.shape[0], guidance


class GaussianDiffusion(nn.Module):
    """DDPM over one token (cosine schedule); two entry points, as MAR's DiffLoss: loss and sample.
    prediction: the head predicts the noise eps (MAR, DDPM) or v = sqrt(a) eps - sqrt(1 - a) x0
    (Salimans & Ho); the sampler turns either into eps. learn_sigma (MAR's default, improved DDPM): the
    head also outputs, per dimension, where the sampling variance lies between the posterior variance
    and beta, trained by the variational bound on a frozen mean; otherwise the posterior variance.
    Two training-only choices, both off in MAR: t_sampling "logit_normal" draws t/T from sigmoid(N(0, 1))
    instead of uniformly; snr_gamma > 0 weights each token's squared error so that it equals
    min(SNR, gamma) times the clean token's squared error (min-SNR-gamma), SNR = acp / (1 - acp). In eval
    mode neither applies, so validation losses stay comparable across recipes."""
    def __init__(self, head, steps=1000, prediction="eps", learn_sigma=False, t_sampling="uniform", snr_gamma=0.0):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}: choose eps or v (or flow, FlowMatching)")
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown t_sampling {t_sampling!r}: choose uniform or logit_normal")
        self.head, self.steps, self.prediction, self.learn_sigma = head, steps, prediction, learn_sigma
        self.t_sampling, self.snr_gamma = t_sampling, snr_gamma
        acp = cosine_alphas_cumprod(steps)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        beta = 1 - acp / acp_prev
        post_var = beta * (1 - acp_prev) / (1 - acp)
        for name, v in dict(acp=acp, log_beta=beta.log(), post_logvar=torch.cat([post_var[1:2], post_var[1:]]).log(),
                            mean_x0=beta * acp_prev.sqrt() / (1 - acp),            # posterior mean coefficients
                            mean_xt=(1 - acp_prev) * (1 - beta).sqrt() / (1 - acp)).items():
            self.register_buffer(name, v.float(), persistent=False)

    def eps_from(self, out, x_t, a):   # the head's output (eps or v) -> eps; a: a tensor or a float
        return (1 - a) ** 0.5 * x_t + a ** 0.5 * out if self.prediction == "v" else out

    @staticmethod
    def learned_logvar(mix, log_beta, log_posterior):   # mix in [-1, 1]: posterior variance (-1) to beta (1)
        return (mix + 1) / 2 * log_beta + (1 - mix) / 2 * log_posterior

    def loss(self, target, z, mul=1, weight=None):
        """target (n, Dt), z (n, D) -> the mean loss over the n tokens, or over those with weight 1 (n,).
        Per token: the squared error of the head's eps or v (whichever `prediction` says), averaged over
        dimensions; with learn_sigma, plus the variational bound's term in bits (the KL to the true
        posterior for t > 0, the decoder's discretised NLL at t = 0), from which only the variance output
        learns. Each token is used mul times, with independent timesteps and noise. Eager, only the
        weighted tokens go through the head; under torch.compile all do, weighted 0/1, so no shape
        depends on the data. Both draw the same random numbers and give the same loss."""
        target, z = target.repeat(mul, 1), z.repeat(mul, 1)
        if self.t_sampling == "logit_normal" and self.training:
            u = torch.sigmoid(torch.randn(target.shape[0], device=target.device))
            t = (u * self.steps).long().clamp(max=self.steps - 1)
        else:
            t = torch.randint(0, self.steps, (target.shape[0],), device=target.device)
        noise = torch.randn_like(target)
        (target, z, t, noise), weight = weighted_tokens(weight, mul, target, z, t, noise)
        a = self.acp[t].unsqueeze(1)
        x_t = a.sqrt() * target + (1 - a).sqrt() * noise
        out = self.head(x_t.to(z.dtype), t, self.head.condition(z)).float()
        if self.learn_sigma:
            out, mix = out.chunk(2, -1)
        want = a.sqrt() * noise - (1 - a).sqrt() * target if self.prediction == "v" else noise   # v or eps
        loss = (out - want.float()).pow(2).mean(1)                                               # per token
        if self.snr_gamma > 0 and self.training:   # |x0 error|^2 = |eps error|^2 / SNR = |v error|^2 / (SNR + 1)
            snr = (a / (1 - a)).squeeze(1)
            loss = loss * (snr.clamp(max=self.snr_gamma) / (snr + 1) if self.prediction == "v"
                           else (self.snr_gamma / snr).clamp(max=1))              # min(SNR, g) / SNR
        if self.learn_sigma:             # + the bound's KL term, which only the variance learns from
            eps = self.eps_from(out.detach(), x_t, a)
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
            i = t.unsqueeze(1)
            logvar = self.learned_logvar(mix, self.log_beta[i], self.post_logvar[i])
            mean = self.mean_x0[i] * x0 + self.mean_xt[i] * x_t
            true_mean, true_logvar = self.mean_x0[i] * target + self.mean_xt[i] * x_t, self.post_logvar[i]
            kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp() + (true_mean - mean) ** 2 / logvar.exp())
            nll = -discretized_gaussian_log_likelihood(target, mean, 0.5 * logvar)     # t = 0: the decoder term
            loss = loss + torch.where(i == 0, nll, kl).mean(1) / math.log(2)
        return loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp(min=1)

    # The predicted clean token is clamped to [-clip_x0, clip_x0] while sampling. MAR does not clip (None
    # reproduces its sampler): with eps prediction x0 = (x_t - sqrt(1 - acp) eps) / sqrt(acp) multiplies
    # the head's error by ~2e4 at t = T, and an imperfect eps head then leaves the data's range for good
    # (docs/sampling.md, "Where the sampler departs from MAR"). Tokens of a VAE scaled to unit variance
    # never reach 10, and v prediction keeps x0 bounded, so the clamp only acts on such runaway steps.
    clip_x0 = 10.0

    @torch.no_grad()
    def sample(self, z, num_steps=100, temperature=1.0, guidance=None, generator=None, sampler="ddpm"):
        """z (n, D) -> tokens (n, Dt). With guidance (a float, or a (n/2,) tensor) z holds the
        conditional rows then the unconditional rows, and n/2 tokens come back, guided as
        eps_u + guidance (eps_c - eps_u).
        Both samplers walk num_steps evenly spaced timesteps down from x_T ~ N(0, I), as MAR's:
          ddpm: ancestral sampling (MAR's p_sample_loop), the noise of each step scaled by temperature
                (MAR's temperature: it never scales x_T);
          ddim: the deterministic DDIM update (eta 0): the same predicted clean token and noise at every
                step, no noise added, so there is nothing for a temperature to scale and it must be 1.
        The predicted clean token is clamped to clip_x0 (MAR: no clamp)."""
        guided, n, guidance = guidance_rows(z, temperature, guidance, sampler)
        ts = torch.linspace(0, self.steps - 1, num_steps, device=z.device).round().long()
        acp = self.acp[ts].double().tolist()       # per-step coefficients as Python floats: no tensor op each
        x = torch.randn(n, self.head.token_dim, generator=generator, device=z.device)
        c = self.head.condition(z)         # the same at every step: embedded once
        t_emb = self.head.time(ts).to(c.dtype)   # each step's timestep embedding, all in one call
        for i in reversed(range(num_steps)):
            a, ap = acp[i], acp[i - 1] if i > 0 else 1.0
            xin = torch.cat([x, x]) if guided else x
            eps = self.head.denoise(xin.to(z.dtype), c + t_emb[i]).float()   # one timestep for all rows
            if self.learn_sigma:
                eps, mix = eps.chunk(2, -1)
                mix = mix[:n]                                            # the conditional rows' variance
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            eps = self.eps_from(eps, x, a)
            x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5                   # predicted clean token
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            if i == 0:
                return x0
            if sampler == "ddim":        # x0 and the noise it implies (after the clamp, as guided-diffusion's
                eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5   # ddim_sample) carried to the next level
                x = ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps
                continue
            beta = 1 - a / ap                                            # respaced beta
            mean = (ap ** 0.5 * beta * x0 + (1 - ap) * (1 - beta) ** 0.5 * x) / (1 - a)
            var = beta * (1 - ap) / (1 - a)                              # posterior variance
            if self.learn_sigma:                                         # or between it and beta, learned
                std = (0.5 * self.learned_logvar(mix, math.log(beta), math.log(var))).exp()
            else:
                std = var ** 0.5
            x = mean + std * temperature * torch.randn(x.shape, generator=generator, device=x.device)
        return x


class FlowMatching(nn.Module):
    """Rectified flow over one token (Liu et al.; Lipman et al.; Stable Diffusion 3), the alternative to
    GaussianDiffusion with the same head and the same two entry points. The path is straight,
    x_t = (1 - t) x0 + t eps for t in [0, 1], and the head predicts its velocity u = eps - x0 (the head's
    timestep input is 1000 t, the scale of DDPM's steps). Training draws t uniformly, or from sigmoid(N(0, 1))
    with t_sampling "logit_normal" (SD3's choice; in eval mode always uniformly).
    Sampling walks num_steps evenly spaced times from t = 1 (x_1 ~ N(0, I)) down to 0:
      ddim: the deterministic update x_s = (1 - s) x0 + s eps, which on this path is exactly the Euler step
            x_s = x_t + (s - t) u of the flow's ODE; no noise, so temperature must be 1;
      ddpm: ancestral: a draw from the Gaussian posterior q(x_s | x_t, x0) of this path, mean
            (1 - s) x0 + s r eps, std s sqrt(1 - r^2) with r = (1 - t) s / ((1 - s) t), its noise scaled by
            temperature (MAR's meaning); DDPM's posterior step in the same terms.
    x0 and eps are the head's prediction turned round: x0 = x_t - t u, eps = x_t + (1 - t) u."""
    clip_x0 = GaussianDiffusion.clip_x0

    def __init__(self, head, t_sampling="uniform"):
        super().__init__()
        if t_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"unknown t_sampling {t_sampling!r}: choose uniform or logit_normal")
        self.head, self.t_sampling = head, t_sampling

    def loss(self, target, z, mul=1, weight=None):
        """As GaussianDiffusion.loss: the squared error of the predicted velocity, averaged over dimensions."""
        target, z = target.repeat(mul, 1), z.repeat(mul, 1)
        if self.t_sampling == "logit_normal" and self.training:
            t = torch.sigmoid(torch.randn(target.shape[0], device=target.device))
        else:
            t = torch.rand(target.shape[0], device=target.device)
        noise = torch.randn_like(target)
        (target, z, t, noise), weight = weighted_tokens(weight, mul, target, z, t, noise)
        x_t = (1 - t[:, None]) * target + t[:, None] * noise
        u = self.head(x_t.to(z.dtype), 1000 * t, self.head.condition(z)).float()
        loss = (u - (noise - target).float()).pow(2).mean(1)
        return loss.mean() if weight is None else (loss * weight).sum() / weight.sum().clamp(min=1)

    @torch.no_grad()
    def sample(self, z, num_steps=100, temperature=1.0, guidance=None, generator=None, sampler="ddpm"):
        """As GaussianDiffusion.sample (guidance u_u + guidance (u_c - u_u)), on the straight path."""
        guided, n, guidance = guidance_rows(z, temperature, guidance, sampler)
        ts = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()   # t = 1, ..., 0 as floats
        x = torch.randn(n, self.head.token_dim, generator=generator, device=z.device)
        c = self.head.condition(z)
        t_emb = self.head.time(1000 * torch.tensor(ts[:-1], device=z.device)).to(c.dtype)
        for i in range(num_steps):
            t, s = ts[i], ts[i + 1]
            u = self.head.denoise((torch.cat([x, x]) if guided else x).to(z.dtype), c + t_emb[i]).float()
            if guided:
                cond, uncond = u.chunk(2)
                u = uncond + guidance * (cond - uncond)
            x0 = x - t * u                                              # predicted clean token
            if self.clip_x0 is not None:
                x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            if i == num_steps - 1:
                return x0
            eps = (x - (1 - t) * x0) / t                                # the noise it implies
            if sampler == "ddim":
                x = (1 - s) * x0 + s * eps
                continue
            r = (1 - t) * s / ((1 - s) * t)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = (1 - s) * x0 + s * r * eps + s * (1 - r * r) ** 0.5 * temperature * noise
        return x

# -----------------------------------------------------------------------------
# 8. UniFluid: batch layout, joint loss


class UniFluid(nn.Module):
    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.tokenizer = tokenizer or ByteTokenizer()
        if cfg.vocab_size != self.tokenizer.vocab_size:
            cfg = replace(cfg, vocab_size=self.tokenizer.vocab_size)
        self.cfg = cfg
        D, N = cfg.d_model, cfg.num_image_tokens
        self.llm = Gemma(cfg)
        self.vision = VisionEncoder(cfg)
        self.und_proj = nn.Linear(cfg.vit_width * cfg.vit_pool ** 2, D)   # ViT features -> und slots
        self.img_proj = nn.Linear(cfg.token_dim, D)            # continuous token -> gen slot
        self.img_pos = nn.Parameter(torch.randn(N, D) * 0.02)  # learned 2D slot position
        self.mask_token = nn.Parameter(torch.randn(D) * 0.02)         # [MASK] (random order) / start (raster)
        self.img_ln = nn.LayerNorm(D) if cfg.img_input_ln else None
        if cfg.text_loss not in ("token", "row"):
            raise ValueError(f"unknown text_loss {cfg.text_loss!r}: choose token or row")
        self.repa_proj = None
        if cfg.repa_weight > 0:        # gen slot i and ViT output i must cover the same patch of the image
            if cfg.latent_size // cfg.patch_size != cfg.image_size // cfg.vit_patch // cfg.vit_pool:
                raise ValueError("repa_weight needs as many ViT outputs as gen slots, on the same grid: "
                                 "choose vit_patch / vit_pool so that image_size / vit_patch / vit_pool = latent_size / patch_size")
            if not 0 < cfg.repa_layer <= cfg.n_layer:
                raise ValueError(f"repa_layer must be between 1 and n_layer ({cfg.n_layer}), got {cfg.repa_layer}")
            self.repa_proj = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, cfg.vit_width * cfg.vit_pool ** 2))
        head = DiffusionHead(cfg.token_dim, D, cfg.head_width, cfg.head_depth,
                             cfg.token_dim * (2 if cfg.learn_sigma else 1))
        if cfg.prediction == "flow":
            if cfg.learn_sigma or cfg.snr_gamma:
                raise ValueError("learn_sigma and snr_gamma are DDPM options a flow head does not have: "
                                 "turn them off or choose prediction eps or v")
            self.diffusion = FlowMatching(head, cfg.t_sampling)
        else:
            self.diffusion = GaussianDiffusion(head, cfg.diffusion_steps, cfg.prediction, cfg.learn_sigma,
                                               cfg.t_sampling, cfg.snr_gamma)
        self.apply(self._init)

    def _init(self, m):                # GPT/Gemma: normal(0, 0.02) weights, zero biases
        if isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.std() != 0:   # keep the head's zero init
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def num_params(self, part=None):
        mod = {"llm": self.llm, "head": self.diffusion, "vision": self.vision}.get(part, self)
        return sum(p.numel() for p in mod.parameters())

    @classmethod
    def from_checkpoint(cls, ckpt, ema=True):
        """The model a train.py checkpoint describes (the dict; load_checkpoint, appendix D, reads the file):
        its config, tokenizer and weights, the EMA weights when it has them and ema is True. ValueError,
        one sentence, if it does not fit."""
        missing = {"model", "config", "tokenizer"} - set(ckpt if isinstance(ckpt, dict) else ())
        if missing:
            raise ValueError(f"not a train.py checkpoint (it lacks {', '.join(sorted(missing))})")
        try:
            model = cls(Config.from_dict(ckpt["config"]), tokenizer_from_state(ckpt["tokenizer"]))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"written by another version of unifluid.py: its config does not fit this code "
                             f"({type(e).__name__}: {e})") from None
        model.load_weights(ckpt["ema"] if ema and ckpt.get("ema") is not None else ckpt["model"])
        return model

    def load_weights(self, weights):
        """load_state_dict, or ValueError (one sentence) when the weights do not fit this config."""
        try:
            self.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"the weights do not match the checkpoint's own config ({str(e).splitlines()[0]})") from None

    # ---- sequence layout (the three layouts at the top of this file): left-padded, so image blocks and answers end each row

    def layout(self, task, prompt, answer=""):
        """Token ids and kinds of one example. Returns (ids, kinds, target ids or -100)."""
        tok, cfg = self.tokenizer, self.cfg
        p = tok.encode(prompt)[: cfg.max_text_len]
        und = [(PAD, KIND_UND)] * cfg.num_und_tokens if task in ("caption", "vqa", "edit") else []
        if task in ("t2i", "edit"):
            seq = und + [(t, KIND_TEXT) for t in [tok.bos_id] + p + [tok.boi_id]] + [(PAD, KIND_GEN)] * cfg.num_image_tokens
            return [s[0] for s in seq], [s[1] for s in seq], [-100] * len(seq)
        a = tok.encode(answer)[: cfg.max_text_len] + [tok.eos_id]
        text = [tok.bos_id] + p + [tok.sep_id] + a
        seq = und + [(t, KIND_TEXT) for t in text]
        targets = [-100] * (len(und) + len(p) + 1) + a + [-100]        # position t predicts token t+1
        return [s[0] for s in seq], [s[1] for s in seq], targets

    def make_batch(self, tasks, prompts, answers=None, gen_tokens=None, und_images=None, pad_multiple=1,
                   gen_images=None):
        """Left-pad the rows of a mixed batch into tensors. gen_tokens (B, N, Dt), und_images and gen_images
        (B, 3, H, W; the images gen_tokens encode, for REPA) are indexed by row; rows that do not use them may
        hold anything. The length is
        rounded up to a multiple of pad_multiple (train.py: 16 under torch.compile, so that a few
        lengths, not every one, get their own compiled graph). gen_rows: the rows with an image block."""
        answers = answers or [""] * len(tasks)
        rows = [self.layout(t, p, a) for t, p, a in zip(tasks, prompts, answers)]
        T = -(-max(len(r[0]) for r in rows) // pad_multiple) * pad_multiple
        pad = lambda xs, v: [v] * (T - len(xs)) + xs
        batch = dict(ids=torch.tensor([pad(r[0], PAD) for r in rows]),
                     kind=torch.tensor([pad(r[1], KIND_PAD) for r in rows]),
                     targets=torch.tensor([pad(r[2], -100) for r in rows]))
        gen_rows = torch.tensor([i for i, t in enumerate(tasks) if t in ("t2i", "edit")], dtype=torch.long)
        und_rows = torch.tensor([t in ("caption", "vqa", "edit") for t in tasks])
        if len(gen_rows) and gen_tokens is not None:
            batch["gen_tokens"], batch["gen_rows"] = gen_tokens[gen_rows], gen_rows
            if gen_images is not None:
                batch["gen_images"] = gen_images[gen_rows]
        if und_rows.any() and und_images is not None:
            batch["und_images"] = und_images[und_rows]
        return batch

    def drop_prompts(self, tasks, prompts, p, generator=None):
        """Classifier-free guidance training: replace t2i prompts and edit instructions by '' with
        probability p (an edit row keeps its input image: the unconditional row generate_images guides with)."""
        drop = torch.rand(len(tasks), generator=generator) < p
        return [("" if d and t in ("t2i", "edit") else s) for t, s, d in zip(tasks, prompts, drop.tolist())]

    # ---- the trunk

    def embed(self, ids, kind, gen_in=None, und_images=None):
        """Token embeddings with image slots filled in (row-major order of the slots)."""
        x = self.llm.embed(ids)
        if und_images is not None:
            und = self.und_proj(self.vision(und_images.to(x.dtype)))            # (Bu, M, D)
            x = x.masked_scatter((kind == KIND_UND).unsqueeze(-1), und.to(x.dtype))
        if gen_in is not None:
            x = x.masked_scatter((kind == KIND_GEN).unsqueeze(-1), gen_in.to(x.dtype))
        return x

    def gen_inputs(self, tokens, mask):
        """Input embeddings of gen slots. Random order: masked slots get [MASK]; raster order: slot i
        reads token i-1 (slot 0 reads the start embedding) and predicts token i."""
        if self.cfg.order == "raster":
            x = self.img_proj(tokens[:, :-1])
            x = torch.cat([self.mask_token.expand(tokens.shape[0], 1, -1), x], 1)
        else:
            x = torch.where(mask.unsqueeze(-1), self.mask_token, self.img_proj(tokens))
        x = x + self.img_pos
        return self.img_ln(x) if self.img_ln is not None else x

    attn_impl = "sdpa"   # "flex" on GPU: FlexAttention block masks (train.py sets it; caches use sdpa)

    def masks(self, kind, impl="sdpa"):
        if impl == "flex" and self.cfg.attn_softcap == 0:
            g = flex_attention_fn(kind, self.cfg.order)
            sw = self.cfg.sliding_window
            return {"global": g, "local": flex_attention_fn(kind, self.cfg.order, sw) if sw else g}
        m = {"global": attention_mask(kind, self.cfg.order)}
        m["local"] = attention_mask(kind, self.cfg.order, self.cfg.sliding_window) \
            if self.cfg.sliding_window > 0 else m["global"]
        return m

    def forward(self, batch, generator=None):
        """Returns dict(loss, loss_image, loss_text); a task absent from the batch contributes 0.
        The weight w of  w * L_image + (1 - w) * L_text  is cfg.image_weight (train.py's --image_weight)."""
        cfg = self.cfg
        w = cfg.image_weight
        ids, kind, targets = batch["ids"], batch["kind"], batch["targets"]
        gen_in, img_mask = None, None
        if "gen_tokens" in batch:
            tokens = batch["gen_tokens"].float()
            B, N, _ = tokens.shape
            if cfg.order == "random":
                img_mask = random_masking(B, N, generator, tokens.device, cfg.mask_ratio_min, cfg.mask_ratio_std)
            else:
                img_mask = torch.ones(B, N, dtype=torch.bool, device=tokens.device)
            gen_in = self.gen_inputs(tokens, img_mask)
        repa = self.repa_proj is not None and gen_in is not None and "gen_images" in batch
        h = self.llm(self.embed(ids, kind, gen_in, batch.get("und_images")), positions(kind),
                     self.masks(kind, self.attn_impl), keep=cfg.repa_layer if repa else 0)
        if repa:
            h, h_mid = h
        # The positions that carry a loss. Eager: gathered (the least work). Under torch.compile: all of them,
        # weighted 0/1, so that no shape depends on the data and the graph never breaks (the same loss).
        zero = h.sum() * 0.0                                     # keeps the graph when a task is absent
        loss_text, loss_image = zero, zero
        sel = targets != -100
        weight = sel.float()                                     # "token": every answer token counts once
        if cfg.text_loss == "row":                               # "row": every row's tokens share one unit
            weight = weight / sel.sum(1, keepdim=True).clamp(min=1)
        if torch.compiler.is_compiling():
            ce = F.cross_entropy(self.llm.logits(h).float().flatten(0, 1), targets.flatten(), reduction="none")
            loss_text = (ce * weight.flatten()).sum() / weight.sum().clamp(min=1e-6)   # ignored targets add 0
        elif sel.any():                                          # logits only where there is a target
            ce = F.cross_entropy(self.llm.logits(h[sel]).float(), targets[sel], reduction="none")
            loss_text = (ce * weight[sel]).sum() / weight[sel].sum()
        if gen_in is not None:                                   # gen slots: the last N positions of gen rows
            z = h[batch["gen_rows"], -tokens.shape[1]:]           # the decoder output z of each gen slot
            loss_image = self.diffusion.loss(tokens.flatten(0, 1), z.flatten(0, 1), cfg.diffusion_batch_mul,
                                             weight=img_mask.flatten())    # the masked slots (all in raster order)
        loss = w * loss_image + (1 - w) * loss_text
        if repa:                                                 # REPA: every gen slot, masked or not
            with torch.no_grad():
                target = self.vision(batch["gen_images"].to(h.dtype))             # (G, N, vit features)
            pred = self.repa_proj(h_mid[batch["gen_rows"], -tokens.shape[1]:])
            loss = loss + cfg.repa_weight * (1 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean())
        return dict(loss=loss, loss_image=loss_image.detach(), loss_text=loss_text.detach())

    # -------------------------------------------------------------------------
    # 9. Generation

    def sampler_defaults(self, temperature=1.0, sampler=None, diffusion_steps=None):
        """-> (sampler, head steps), filling in what is None: the deterministic ddim sampler in 10 steps for a
        v-prediction or flow head at temperature 1, else MAR's ancestral ddpm in 20 (MAR: 100). Measured
        (docs/sampling.md): trained heads lose no accuracy at these counts, and ddim carries an eps head's
        error at t = T to the end, where ddpm's noise washes it out."""
        sampler = sampler or ("ddim" if self.cfg.prediction in ("v", "flow") and temperature == 1.0 else "ddpm")
        return sampler, diffusion_steps or (10 if sampler == "ddim" else 20)

    @torch.no_grad()
    def generate_images(self, prompts, num_iter=12, guidance=3.0, temperature=1.0, diffusion_steps=None,
                        und_images=None, generator=None, use_cache=True, batch_cfg=True, on_step=None, sampler=None):
        """Text (and, for editing, an input image) -> latent grids (B, C, h, w).
        MAR sampling: all N slots start masked; at step k the slots still masked follow
        cos(pi/2 (k+1)/K) * N in a random order; the classifier-free guidance scale grows linearly with
        the revealed fraction, from 1 towards `guidance` (MAR's linear schedule: 1 + (guidance - 1)(N - 1)/N
        at the last step, as MAR's; 1 = no guidance). sampler ("ddpm" or "ddim", GaussianDiffusion.sample) and
        diffusion_steps (the head's steps per token): None picks them (sampler_defaults).
        cond and uncond rows run as one batch (batch_cfg); the prefix keys/values are computed once
        (use_cache). Both switches exist for the naive baseline of `sample.py --bench`. on_step(k, latents,
        mask), if given, sees each step's result: the grids drawn so far (masked slots hold zeros) and the
        (B, N) mask of the slots still masked (`sample.py --reveal` draws them; it must not use generator)."""
        cfg, dev = self.cfg, self.llm.embed_tokens.weight.device
        B, N, guided = len(prompts), cfg.num_image_tokens, guidance != 1.0
        sampler, diffusion_steps = self.sampler_defaults(temperature, sampler, diffusion_steps)
        task = "edit" if und_images is not None else "t2i"
        tasks, texts = [task] * B, list(prompts)
        if guided:                       # uncond rows: the empty prompt (image kept for editing)
            tasks, texts = tasks * 2, texts + [""] * B
            und_images = torch.cat([und_images, und_images]) if und_images is not None else None
        batch = self.make_batch(tasks, texts, und_images=und_images)
        ids, kind = batch["ids"].to(dev), batch["kind"].to(dev)
        und = batch["und_images"].to(dev) if "und_images" in batch else None
        pos, masks = positions(kind), self.masks(kind)
        P = ids.shape[1] - N                                                   # prefix length
        cache = None
        if use_cache:                    # prefix (text, und block) never attends the image block
            cache = KVCache(cfg, ids.shape[0], ids.shape[1], dev, self.llm.embed_tokens.weight.dtype)
            prefix = self.embed(ids[:, :P], kind[:, :P], None, und)
            self.llm(prefix, pos[:, :P], {k: m[:, :, :P, :P] for k, m in masks.items()}, cache, 0)

        def trunk(gen_in, slots):        # -> z of the given image slots (rows, k, D); slots (rows, k)
            if use_cache:
                return self.llm(gen_in, pos[:, P:], {k: m[:, :, P:] for k, m in masks.items()}, cache, P, rows=slots)
            if guided and not batch_cfg:   # naive: cond and uncond rows as two separate passes
                half = lambda x, i: x[i * B:(i + 1) * B] if x is not None else None
                return torch.cat([self.llm(self.embed(half(ids, i), half(kind, i), half(gen_in, i), half(und, i)),
                                           half(pos, i), {k: half(m, i) for k, m in masks.items()},
                                           rows=half(slots, i) + P) for i in range(2)])
            return self.llm(self.embed(ids, kind, gen_in, und), pos, masks, rows=slots + P)

        tokens = torch.zeros(B, N, cfg.token_dim, device=dev)
        mask = torch.ones(B, N, dtype=torch.bool, device=dev)
        if cfg.order == "raster":
            steps, orders = N, torch.arange(N - 1, -1, -1, device=dev).expand(B, N)  # last slots masked longest
        else:
            steps, orders = num_iter, random_orders(B, N, generator, dev)
        rows = lambda x: torch.cat([x, x]) if guided else x
        for k in range(steps):
            if cfg.order == "raster":
                mask_len = N - k - 1
            else:                        # MAR keeps >= 1 slot masked in this count, the last step's too, where
                mask_len = int(math.floor(N * math.cos(math.pi / 2 * (k + 1) / steps)))   # it sets only
                mask_len = max(1, min(int(mask.sum(1).min()) - 1, mask_len))              # the guidance
            new_mask = mask_by_order(mask_len, orders) if k < steps - 1 else torch.zeros_like(mask)
            reveal = mask & ~new_mask                      # (B, N), the same count in every row
            scale = 1 + (guidance - 1) * (N - mask_len) / N
            slots = reveal.nonzero()[:, 1].view(B, -1)     # the revealed slots, row by row, ascending
            # every slot's state feeds the others through attention, but only the revealed ones reach the head
            z = trunk(rows(self.gen_inputs(tokens, mask)), rows(slots))          # (rows, k, D)
            zr = z.reshape(-1, z.shape[-1])                # cond rows' tokens, then the uncond rows'
            out = self.diffusion.sample(zr, diffusion_steps, temperature, scale if guided else None, generator,
                                        sampler)
            tokens = tokens.clone()
            tokens[reveal] = out.to(tokens.dtype)
            mask = new_mask
            if on_step is not None:
                on_step(k, unpatchify(tokens, cfg.patch_size, cfg.latent_channels), mask)
        return unpatchify(tokens, cfg.patch_size, cfg.latent_channels)

    @torch.no_grad()
    def generate_text(self, und_images, prompts, max_new_tokens=32, temperature=0.0, top_k=None,
                      generator=None, use_cache=True, return_logits=False):
        """Captioning / VQA: [und] <bos> prompt <sep> -> answer, greedy (temperature 0) or sampled."""
        config, tok, dev = self.cfg, self.tokenizer, self.llm.embed_tokens.weight.device
        B = len(prompts)
        rows = [self.layout("vqa", p) for p in prompts]
        rows = [(i[:-1], k[:-1]) for i, k, _ in rows]          # drop the (empty answer's) eos
        T0 = max(len(r[0]) for r in rows)
        ids = torch.tensor([[PAD] * (T0 - len(i)) + i for i, _ in rows], device=dev)
        kind = torch.tensor([[KIND_PAD] * (T0 - len(k)) + k for _, k in rows], device=dev)
        kind = torch.cat([kind, torch.full((B, max_new_tokens), KIND_TEXT, device=dev)], 1)
        ids = torch.cat([ids, torch.full((B, max_new_tokens), PAD, device=dev)], 1)
        pos, masks = positions(kind), self.masks(kind)
        und = und_images.to(dev)
        cache = KVCache(config, B, ids.shape[1], dev, self.llm.embed_tokens.weight.dtype) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out, all_logits, T = [], [], T0
        for step in range(max_new_tokens):
            if use_cache:
                s = 0 if step == 0 else T - 1
                x = self.embed(ids[:, s:T], kind[:, s:T], None, und if step == 0 else None)
                h = self.llm(x, pos[:, s:T], {k: m[:, :, s:T, :T] for k, m in masks.items()}, cache, s)
            else:
                x = self.embed(ids[:, :T], kind[:, :T], None, und)
                h = self.llm(x, pos[:, :T], {k: m[:, :, :T, :T] for k, m in masks.items()})
            logits = self.llm.logits(h[:, -1]).float()             # last position only
            all_logits.append(logits)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                lg = logits / temperature
                if top_k:
                    v, _ = torch.topk(lg, min(top_k, lg.shape[-1]))
                    lg = lg.masked_fill(lg < v[:, -1:], float("-inf"))
                nxt = torch.multinomial(lg.softmax(-1), 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, tok.eos_id), nxt)
            out.append(nxt)
            done = done | (nxt == tok.eos_id)
            ids[:, T] = nxt
            T += 1
            if done.all() or T == ids.shape[1]:
                break
        gen = torch.stack(out, 1).tolist()
        texts = [tok.decode(g[: g.index(tok.eos_id)] if tok.eos_id in g else g) for g in gen]
        return (texts, torch.stack(all_logits, 1)) if return_logits else texts

# -----------------------------------------------------------------------------
# Appendix A. Tokenizers: built in, no files. SPECIALS first, then the 256 bytes, then (word tokenizer) words.



class ByteTokenizer:
    """UTF-8 bytes: works for any text, at the cost of several tokens per word."""
    pad_id, bos_id, eos_id, boi_id, eoi_id, sep_id = PAD, BOS, EOS, BOI, EOI, SEP

    @property
    def vocab_size(self):
        return N_SPECIAL + 256

    def encode(self, text):
        return [N_SPECIAL + b for b in text.encode("utf-8")]

    def _piece_bytes(self, i):     # bytes of one non-special id
        return bytes([i - N_SPECIAL])

    def decode(self, ids):
        out = b"".join(self._piece_bytes(i) for i in ids if i >= N_SPECIAL)
        return out.decode("utf-8", errors="replace")

    def state_dict(self):
        return {"kind": "byte"}


class WordTokenizer(ByteTokenizer):
    """Frequent words (with their leading space, like GPT-2's 'Ġred') from the training captions;
    any other piece falls back to bytes, so every string round-trips exactly."""
    split = re.compile(r" ?[^\s]+|\s")

    def __init__(self, words):
        self.words = list(words)
        self.index = {w: N_SPECIAL + 256 + i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts, max_words=4000, min_count=2):
        counts = Counter(p for t in texts for p in cls.split.findall(t))
        return cls([w for w, c in counts.most_common(max_words) if c >= min_count and len(w) > 1])

    @property
    def vocab_size(self):
        return N_SPECIAL + 256 + len(self.words)

    def encode(self, text):
        ids = []
        for piece in self.split.findall(text):
            if piece in self.index:
                ids.append(self.index[piece])
            else:
                ids.extend(N_SPECIAL + b for b in piece.encode("utf-8"))
        return ids

    def _piece_bytes(self, i):
        return bytes([i - N_SPECIAL]) if i < N_SPECIAL + 256 else self.words[i - N_SPECIAL - 256].encode()

    def decode(self, ids):
        """Exact inverse of encode. A model can also emit a word without its leading space ('large')
        right after another word, which no encoded text does: those get their space back, so answers
        read 'large large no' and not 'largelargeno'."""
        out = b""
        for i in ids:
            if i < N_SPECIAL:
                continue
            piece = self._piece_bytes(i)
            if i >= N_SPECIAL + 256 and out and not out[-1:].isspace() and not piece[:1].isspace():
                piece = b" " + piece
            out += piece
        return out.decode("utf-8", errors="replace")

    def state_dict(self):
        return {"kind": "word", "words": self.words}


class GemmaTokenizer:
    """A pretrained Gemma tokenizer.json through the `tokenizers` package (an optional extra). We add
    <bos> ourselves (encode adds no specials). Gemma-3 has <start_of_image>/<end_of_image>; Gemma-1/2
    use the reserved <unused0>/<unused1> instead. The answer separator is "\\n", as in PaliGemma.
    The JSON text travels in state_dict, so a checkpoint needs no tokenizer folder."""
    specials = dict(pad_id=["<pad>"], bos_id=["<bos>"], eos_id=["<eos>"], boi_id=["<start_of_image>", "<unused0>"],
                    eoi_id=["<end_of_image>", "<unused1>"], sep_id=["\n", "<unused2>"])

    def __init__(self, json_text, vocab_size=None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError("a Gemma tokenizer needs the 'tokenizers' package: pip install tokenizers") from e
        self.json_text, self.tok = json_text, Tokenizer.from_str(json_text)
        # the embedding may have more rows than the tokenizer has tokens (padded vocabularies)
        self._vocab_size = max(vocab_size or 0, self.tok.get_vocab_size(with_added_tokens=True))
        for name, candidates in self.specials.items():
            ids = [self.tok.token_to_id(t) for t in candidates]
            if name == "sep_id":           # "\n" is a plain token: whatever id the text encodes to
                nl = self.tok.encode("\n", add_special_tokens=False).ids
                ids[0] = nl[0] if len(nl) == 1 else None
            if all(i is None for i in ids):
                raise ValueError(f"tokenizer.json has none of {candidates} (needed for {name})")
            setattr(self, name, next(i for i in ids if i is not None))

    @property
    def vocab_size(self):
        return self._vocab_size

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def state_dict(self):
        return {"kind": "gemma", "json": self.json_text, "vocab_size": self._vocab_size}


def tokenizer_from_state(state):
    if state["kind"] == "byte":
        return ByteTokenizer()
    if state["kind"] == "word":
        return WordTokenizer(state["words"])
    if state["kind"] == "gemma":
        return GemmaTokenizer(state["json"], state["vocab_size"])
    raise ValueError(f"unknown tokenizer kind {state['kind']!r} in checkpoint")

# -----------------------------------------------------------------------------
# Appendix B. Hugging Face Gemma-1/2/3 text decoders and SigLIP vision towers. config.json -> our Config
# fields, their tensor names -> our modules (pure functions of dicts: read_hf_folder in appendix D reads the
# files). As nanoGPT's GPT.from_pretrained, the map lives beside the names it maps.


def gemma_config(hf):
    """Decoder fields of Config from a Hugging Face Gemma config.json. What differs between versions:
    Gemma-1: no sandwich norms, queries scaled by head_dim**-0.5, no sliding window, one RoPE base.
    Gemma-2: sandwich norms, query_pre_attn_scalar, soft-capping (attention 50, final 30), local/global
             layers alternating (window 4096).
    Gemma-3: + QK-norm, no soft-capping, 5 local : 1 global, RoPE base 10k local and 1M global."""
    family = hf.get("model_type")
    if family not in ("gemma", "gemma2", "gemma3_text"):
        raise ValueError(f"model_type {family!r} is not a Gemma text decoder (gemma, gemma2, gemma3_text); "
                         f"for a multimodal Gemma-3 use the text-only checkpoint (e.g. gemma-3-1b)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu", "gelu_pytorch_tanh"):   # Gemma-1's legacy "gelu" means the tanh approximation
        raise ValueError(f"hidden activation {act!r} is not supported (Gemma uses gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("bidirectional Gemma encoders (EmbeddingGemma) are not causal decoders")
    rope = hf.get("rope_parameters") or {}         # transformers >= 5; older files: rope_theta + rope_scaling

    def rope_base(layer_type, default):
        p = rope.get(layer_type, rope)             # Gemma-3 keeps one dict per layer type
        scaling = p.get("rope_type", "default") if p else (hf.get("rope_scaling") or {}).get("rope_type", "default")
        if scaling != "default":
            raise ValueError(f"RoPE scaling {scaling!r} is not supported (only the default RoPE)")
        return float(p.get("rope_theta") or default)

    n, g1, g3 = hf["num_hidden_layers"], family == "gemma", family == "gemma3_text"
    global_base = rope_base("full_attention", hf.get("rope_theta") or (1e6 if g3 else 1e4))
    local_base = rope_base("sliding_attention", hf.get("rope_local_base_freq") or (1e4 if g3 else global_base))
    types = hf.get("layer_types") or [
        "full_attention" if g1 or (i + 1) % (hf.get("sliding_window_pattern", 6) if g3 else 2) == 0
        else "sliding_attention" for i in range(n)]
    is_global = [t == "full_attention" for t in types]
    window = 0 if g1 or all(is_global) else hf.get("sliding_window") or 4096
    # a periodic pattern is a global_every; anything else is spelled out layer by layer
    every = next((k for k in range(1, n + 2) if is_global == [(i + 1) % k == 0 for i in range(n)]), 0)
    hd = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return dict(vocab_size=hf["vocab_size"], n_layer=n, d_model=hf["hidden_size"], n_head=hf["num_attention_heads"],
                n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hd,
                d_ff=hf["intermediate_size"], rope_base=global_base, rope_local_base=local_base,
                query_scale=hd if g1 else float(hf.get("query_pre_attn_scalar") or hd), qk_norm=g3,
                sandwich_norm=not g1, attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                final_softcap=float(hf.get("final_logit_softcapping") or 0.0), sliding_window=window,
                global_every=every or 1, layer_pattern="" if every else "".join("GL"[not g] for g in is_global),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)))


def siglip_config(hf):
    """ViT fields of Config from a SigLIP config.json (a SiglipVisionModel, or a whole SiglipModel)."""
    v = hf.get("vision_config", hf)
    if v.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or v.get("layer_norm_eps", 1e-6) != 1e-6:
        raise ValueError("only SigLIP towers with gelu_pytorch_tanh and LayerNorm eps 1e-6 are supported")
    return dict(image_size=v["image_size"], vit_patch=v["patch_size"], vit_width=v["hidden_size"],
                vit_layers=v["num_hidden_layers"], vit_heads=v["num_attention_heads"], vit_mlp=v["intermediate_size"])


def load_exact(module, tensors, ckpt_name, what):
    """Copy tensors into module, our name k read from tensors[ckpt_name(k)]; every tensor must be used
    and every shape must match, or a ValueError lists what is missing, unexpected or mis-shaped."""
    own = module.state_dict()
    names = {ckpt_name(k): k for k in own}
    missing = sorted(n for n in names if n not in tensors)
    unexpected = sorted(n for n in tensors if n not in names)
    shapes = [f"{n} {tuple(tensors[n].shape)} (model expects {tuple(own[k].shape)})"
              for n, k in names.items() if n in tensors and tensors[n].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{title} ({len(xs)}): {', '.join(xs[:20])}{' ...' if len(xs) > 20 else ''}"
                 for title, xs in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if xs]
        raise ValueError(f"the {what} checkpoint does not match the model:\n  " + "\n  ".join(lines))
    with torch.no_grad():
        for n, k in names.items():
            own[k].copy_(tensors[n])               # casts bf16 checkpoints to the model's dtype


def load_gemma(model, tensors):
    """Hugging Face Gemma weights (model.embed_tokens, model.layers.N..., model.norm; the head is tied)
    into model.llm (or a bare Gemma). The model must come from gemma_config of the same checkpoint.
    Trap: Gemma-1's post_attention_layernorm is the pre-MLP norm, our pre_feedforward_layernorm."""
    llm = getattr(model, "llm", model)
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq")}
    gemma1 = not llm.cfg.sandwich_norm
    rename = lambda k: prefix + (k.replace("pre_feedforward_layernorm", "post_attention_layernorm") if gemma1 else k)
    load_exact(llm, tensors, rename, "Gemma")


def load_siglip(model, tensors, freeze=False):
    """SigLIP vision tower weights into model.vision; the pooling head (head.*) and a SiglipModel's
    text tower are not used (und slots read every patch feature). freeze: no gradient for the ViT."""
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    tensors = {k: v for k, v in tensors.items() if k.startswith(prefix) and not k.startswith(prefix + "head.")}
    load_exact(model.vision, tensors, lambda k: prefix + k, "SigLIP")
    model.vision.requires_grad_(not freeze)

# -----------------------------------------------------------------------------
# Appendix C. FLOPs, for the MFU printed in the training log


def estimate_flops_per_example(cfg, task_mix=None, text_len=12):
    """Training FLOPs of one example (forward + backward = 3x forward = 6 * params * tokens, PaLM /
    nanoGPT), averaged over the task mix. Counts the decoder (matmuls + attention scores), the tied
    text head at answer positions, the ViT on und rows, and the diffusion head, which runs
    diffusion_batch_mul times on every masked gen slot (mean_mask_ratio of the config)."""
    task_mix = task_mix or {"t2i": 1.0}
    D, hd = cfg.d_model, cfg.head_dim
    layer = D * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * D + 3 * D * cfg.d_ff
    w = cfg.head_width
    head = (cfg.token_dim + D + 2 * w) * w + cfg.head_depth * 5 * w * w + 2 * w * w + w * cfg.token_dim
    vw = cfg.vit_width
    vit = cfg.vit_layers * (4 * vw * vw + 2 * vw * cfg.vit_mlp) + 3 * cfg.vit_patch ** 2 * vw
    N, M, V = cfg.num_image_tokens, cfg.num_und_tokens, cfg.num_vit_tokens
    masked = mean_mask_ratio(cfg.mask_ratio_min, cfg.mask_ratio_std) * N if cfg.order == "random" else N
    total = 0.0
    for task, share in task_mix.items():
        gen, und = task in ("t2i", "edit"), task in ("caption", "vqa", "edit")
        T = text_len + (N if gen else 0) + (M if und else 0)
        f = 6 * (cfg.n_layer * layer * T + cfg.n_layer * 2 * cfg.n_head * hd * T * T)
        if gen:
            f += 6 * head * masked * cfg.diffusion_batch_mul
        if und:
            f += 6 * vit * V + 6 * vw * cfg.vit_pool ** 2 * D * M + 6 * D * cfg.vocab_size * (text_len // 2)
        total += share * f
    return total


# -----------------------------------------------------------------------------
# Appendix D. Checkpoints and weight files. A checkpoint is one torch.save'd dict of plain data: the
# uncompiled model's weights (no `_orig_mod.` prefix) and their EMA, AdamW state, step, Config, tokenizer,
# VAE spec, flags and random states; train.py writes it atomically (save_checkpoint; a sharded --fsdp run
# saves what one process would hold), load_checkpoint reads it ready to sample. Weight files from
# elsewhere are read without running code: torch_load (weights-only pickles), read_safetensors (header
# checked against the file size), read_hf_folder (Hugging Face folders, mapped by appendix B).


def save_checkpoint(path, model, optimizer, ema_model, step, tokenizer, vae_spec, args, **extra):
    """Keys: model, ema, optimizer, step, config, tokenizer, vae, args, rng (+ extra, e.g. bad_steps).
    A sharded (--fsdp) model is saved as one process would hold it: every rank calls this (the shards are
    gathered to full CPU tensors) and rank 0 writes, so any run, sharded or not, can resume or sample it."""
    states = dict(model=model_state(model), ema=model_state(ema_model) if ema_model is not None else None,
                  optimizer=optimizer_state(model, optimizer) if optimizer is not None else None)
    if is_sharded(model) and dist.get_rank() != 0:
        return
    ckpt = dict(**states, step=step,
                config=model.cfg.to_dict(), tokenizer=tokenizer.state_dict(), vae=vae_spec,
                args={k: v if isinstance(v, (int, float, str, list, dict, type(None))) else str(v)
                      for k, v in vars(args).items()}, rng=rng_state(), **extra)
    with open(path + ".tmp", "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())             # on disk before the rename, so even a power cut leaves one whole file
    os.replace(path + ".tmp", path)      # atomic: a reader or a crash mid-write never sees a torn ckpt.pt


def rng_state():
    return dict(python=random.getstate(), numpy=[x.tolist() if isinstance(x, np.ndarray) else x
                                                 for x in np.random.get_state()],
                torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    st = s["numpy"]
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def model_state(model):
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer):
    """optimizer.state_dict()'s layout (parameters numbered in param_groups order) also when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:                         # full_state_dict + cpu_offload: only rank 0 receives it
        return full
    index = {name: i for i, name in enumerate(param_names(model, optimizer))}   # full is keyed by parameter name
    return dict(state={index[n]: s for n, s in full["state"].items()},
                param_groups=[{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]])


def load_optimizer_state(model, optimizer, state):
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = param_names(model, optimizer)
    full = dict(state={names[i]: s for i, s in state["state"].items()},
                param_groups=[{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]])
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def param_names(model, optimizer):
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def checkpoint_path(path_or_dir):
    return os.path.join(path_or_dir, "ckpt.pt") if os.path.isdir(path_or_dir) or not path_or_dir.endswith(".pt") \
        else path_or_dir


def read_checkpoint(path_or_dir):
    """The dict save_checkpoint wrote; FileNotFoundError or ValueError (one sentence) otherwise.
    weights_only: a file from elsewhere can hold tensors and plain data, never code that runs on load."""
    path = checkpoint_path(path_or_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: train one first with "
                                f"`python train.py --out_dir {os.path.dirname(path) or '.'}`")
    ckpt = torch_load(path)
    missing = {"model", "config", "tokenizer", "vae", "step"} - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint (it lacks {', '.join(sorted(missing))})")
    return ckpt


def load_checkpoint(path_or_dir, device="cpu", ema=True):
    """-> (model, vae, tokenizer, ckpt) ready for inference; the EMA weights when there are some."""
    from vae import load_vae        # lazy: vae.py imports this module's readers of weight files
    ckpt = read_checkpoint(path_or_dir)
    try:
        model = UniFluid.from_checkpoint(ckpt, ema)
    except ValueError as e:
        raise ValueError(f"{checkpoint_path(path_or_dir)}: {e}") from None
    return model.to(device).eval(), load_vae(ckpt["vae"], device), model.tokenizer, ckpt


def torch_load(path):
    """torch.load of an untrusted file: tensors and plain containers only (weights_only: a pickle that
    would run code is refused), and any unreadable file becomes one ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # UnpicklingError, a torn zip (RuntimeError), EOFError, ...
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path} cannot be read as PyTorch weights ({type(e).__name__}: {why})") from None


def read_safetensors(path):
    """{name: tensor} of a .safetensors file, or ValueError naming the file. The header's declared length
    and tensor offsets are checked against the file size first, so a hostile or truncated file can
    neither make the reader allocate what the file does not hold nor crash it."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError(f"reading {path} needs the 'safetensors' package: pip install safetensors") from e
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        header = f.read(n) if 0 < n <= min(size - 8, 100 << 20) else None   # 100 MB: the library's own cap
    try:
        meta = json.loads(header) if header is not None else None
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is not a safetensors file (header of {n} bytes in a {size}-byte file)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in meta.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        end = None
    if end is None or end > size - 8 - n:
        raise ValueError(f"{path} is truncated or malformed: its header lists tensors the file does not hold")
    try:
        return load_file(path)
    except Exception as e:  # SafetensorError and friends
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def read_hf_folder(path):
    """A Hugging Face model folder -> (config.json as a dict, {name: tensor}). The weights are
    model.safetensors, or the shards that model.safetensors.index.json lists."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights (only safetensors are read)")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(os.path.join(path, f)))
    return hf, tensors
