"""
Checkpoints and weight files: what train.py writes, and every reader of weights in the project.

    save_checkpoint(path, model, optimizer, ema_model, step, tokenizer, vae_spec, args)   # train.py
    model, vae, tokenizer, ckpt = load_checkpoint("out/shapes")     # ready to sample (sample.py, data/plots.py)
    ckpt = read_checkpoint("out/shapes")                            # the dict, to resume (train.py)

A checkpoint is one torch.save'd dict of plain data: the uncompiled model's weights (no `_orig_mod.`
prefix) and their EMA, AdamW state, step, the model Config, the tokenizer, the VAE spec, the flags and
the random states. Files from elsewhere are read without running code: torch_load (weights_only
pickles), read_safetensors (header checked against the file size), read_hf_folder (Hugging Face
folders; unifluid.py's appendix maps their tensor names to ours, vae.py reads VAE weights with these).
"""
import json
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from unifluid import UniFluid

# -----------------------------------------------------------------------------
# train.py's checkpoints: written atomically, read with one sentence when they cannot be


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


def checkpoint_path(path_or_dir):
    return os.path.join(path_or_dir, "ckpt.pt") if os.path.isdir(path_or_dir) or not path_or_dir.endswith(".pt") \
        else path_or_dir


def load_checkpoint(path_or_dir, device="cpu", ema=True):
    """-> (model, vae, tokenizer, ckpt) ready for inference; the EMA weights when there are some."""
    from vae import load_vae        # lazy: vae.py reads its weight files with this module's readers
    ckpt = read_checkpoint(path_or_dir)
    try:
        model = UniFluid.from_checkpoint(ckpt, ema)
    except ValueError as e:
        raise ValueError(f"{checkpoint_path(path_or_dir)}: {e}") from None
    return model.to(device).eval(), load_vae(ckpt["vae"], device), model.tokenizer, ckpt


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

# -----------------------------------------------------------------------------
# FSDP (--fsdp): sharded weights and AdamW state are saved and loaded as one process would hold them


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

# -----------------------------------------------------------------------------
# Weight files from elsewhere: never code that runs on load, one ValueError naming a bad file


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
