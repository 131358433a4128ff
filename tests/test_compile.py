"""torch.compile on CPU: the training step compiles into one graph per padded length, never breaks, and
computes what eager computes; the GPU's FlexAttention mask path gives SDPA's result. Each test compiles
the tiny preset once (tens of seconds on 2 cores)."""
import random
import re
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

import train
from unifluid import Config, UniFluid

# torch.compile on CPU writes C++ kernels: without a compiler there is nothing to test
pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                                reason="torch.compile on CPU needs a C++ compiler (e.g. apt install g++)")

WORDS = "red blue green circle square triangle left of right above below big small two three".split()
ROWS = {"t2i": 3, "caption": 2, "vqa": 2, "edit": 1}     # fixed per micro-batch, as train.py's TaskStreams


@pytest.fixture
def fresh_dynamo():
    """Empty compile caches and counters; the inductor draws its random numbers as eager does. The option is
    set through torch's own `config.patch`, which restores it on exit (pytest's monkeypatch cannot: torch's
    config module keeps its options outside the module's __dict__, so undoing a setattr deletes the option)."""
    import torch._inductor.config as inductor_config
    torch.compiler.reset()
    counters.clear()
    with inductor_config.patch(fallback_random=True):
        yield
    torch.compiler.reset()


def tiny(**kw):
    torch.manual_seed(0)
    return UniFluid(Config.preset("tiny", **kw))


def mixed_batch(model, seed, words=(1, 6)):
    """A micro-batch as train.py builds it: fixed rows per task, random prompts and answers, padded to a
    multiple of train.PAD_MULTIPLE."""
    rng, g, c = random.Random(seed), torch.Generator().manual_seed(seed), model.cfg
    tasks = [t for t, n in ROWS.items() for _ in range(n)]
    text = lambda: " ".join(rng.choices(WORDS, k=rng.randint(*words)))
    prompts = ["" if t == "caption" else text() for t in tasks]
    answers = [text() if t in ("caption", "vqa") else "" for t in tasks]
    gen = torch.randn(len(tasks), c.num_image_tokens, c.token_dim, generator=g)
    img = torch.rand(len(tasks), 3, c.image_size, c.image_size, generator=g) * 2 - 1
    return model.make_batch(tasks, prompts, answers, gen, img, pad_multiple=train.PAD_MULTIPLE)


def loss_and_grads(model, batch, seed, call=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)              # masking, timesteps and noise, as train.py seeds each micro-batch
    out = (model if call is None else call)(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("prediction", ["eps", "flow"])    # MAR's DDPM head and the quickstart's flow head
def test_compiled_training_step_equals_eager_one_graph_per_length_no_breaks(fresh_dynamo, prediction):
    model = tiny(prediction=prediction)
    compiled = torch.compile(model, dynamic=False)
    lengths = set()
    for i in range(8):                   # one-word and 4-6-word texts: two padded lengths, in turn
        batch = mixed_batch(model, i, words=(1, 1) if i % 2 else (4, 6))
        lengths.add(batch["ids"].shape[1])
        ref, ref_grads = loss_and_grads(model, batch, seed=i)
        out, grads = loss_and_grads(model, batch, seed=i, call=compiled)
        for k in ("loss", "loss_image", "loss_text"):
            assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-5), (i, k, out[k], ref[k])
        assert grads.keys() == ref_grads.keys()
        for n, g in grads.items():
            assert torch.allclose(g, ref_grads[n], rtol=1e-3, atol=1e-5), (i, n)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(lengths) == 2 and all(n % train.PAD_MULTIPLE == 0 for n in lengths), lengths
    assert counters["stats"]["unique_graphs"] == len(lengths), (counters["stats"], lengths)


def test_compiled_flex_attention_matches_sdpa_for_all_layouts(fresh_dynamo):
    """The GPU path (FlexAttention block masks) compiled on CPU, forward only (torch 2.13 has no CPU
    backward for it): t2i, caption, vqa and edit rows of different lengths, so rows are left-padded."""
    model = tiny().eval()
    batch = mixed_batch(model, 0, words=(1, 9))
    assert (batch["kind"] == 0).any(1).sum() >= 4                        # padded rows
    with torch.no_grad():
        torch.manual_seed(1)
        ref = model(batch)
        model.attn_impl = "flex"
        torch.manual_seed(1)
        out = torch.compile(model, dynamic=False)(batch)
    for k in ref:
        assert torch.allclose(out[k], ref[k], rtol=1e-4, atol=1e-5), (k, out[k], ref[k])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_train_py_compiled_run_logs_graphs_and_breaks(fresh_dynamo, tmp_path, capsys, vae_path):
    train.main(["--model", "tiny", "--batch_size", "8", "--max_steps", "4", "--warmup", "1", "--log_interval", "2",
                "--eval_interval", "1000", "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2",
                "--diffusion_steps", "2", "--compile", "on", "--vit_pretrain", "0", "--vae", vae_path,
                "--out_dir", str(tmp_path / "run")])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("step 4/4 |")]
    assert lines and re.search(r"\| [1-9]\d* graphs compiled, 0 graph breaks", lines[0]), lines


def test_generation_and_captioning_under_compile_give_the_eager_outputs(fresh_dynamo):
    """Sampling is compiled method by method (its shapes change every reveal step and with the KV cache,
    so graphs may break there; train.py and sample.py sample eagerly): the same tokens and logits."""
    model = tiny().eval()
    with torch.no_grad():                # an untrained head outputs exactly 0 and flat logits: make both matter
        for p in model.diffusion.parameters():
            p.normal_(0, 0.05)
        model.llm.embed_tokens.weight.normal_(0, 0.2)
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref_text, ref_logits = model.generate_text(img, ["", "what color"], max_new_tokens=6, return_logits=True)
    text, logits = torch.compile(model.generate_text)(img, ["", "what color"], max_new_tokens=6, return_logits=True)
    assert text == ref_text and (logits - ref_logits).abs().max() < 1e-4
    gen = lambda f: f(["a red circle", "two"], num_iter=2, diffusion_steps=3, generator=torch.Generator().manual_seed(0))
    ref_images, images = gen(model.generate_images), gen(torch.compile(model.generate_images))
    assert ref_images.abs().max() > 0 and (images - ref_images).abs().max() < 1e-4
