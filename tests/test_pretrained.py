"""Starting from pretrained parts: Hugging Face Gemma-1/2/3 decoders and SigLIP towers load into ours and
compute the same outputs (the weights are gated: tiny random checkpoints in the same layout stand in),
a checkpoint that does not match says what is wrong, and the Gemma tokenizer travels in our checkpoint."""
import json
import os

import pytest
import torch

import unifluid
import train
from unifluid import (KIND_TEXT, Config, Gemma, GemmaTokenizer, UniFluid, attention_mask, gemma_config, load_gemma,
                      load_siglip, positions, siglip_config, tokenizer_from_state)

VOCAB = 300          # the tiny tokenizer below has 300 tokens; the tiny checkpoints use the same vocabulary
T = 16               # prompt length: longer than the sliding window of 4


def randomize(hf_model, seed=0):
    """HF initialises the Gemma norms to 0 (weight 1 + w): give every tensor random values, so a norm in
    the wrong place or a wrong scale shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.1))
    return hf_model.eval()


def save_gemma(tmp_path, version, **kw):
    """A tiny random Gemma-1/2/3 text checkpoint written by save_pretrained (config.json + safetensors)."""
    transformers = pytest.importorskip("transformers")
    cls = {1: ("GemmaConfig", "GemmaForCausalLM"), 2: ("Gemma2Config", "Gemma2ForCausalLM"),
           3: ("Gemma3TextConfig", "Gemma3ForCausalLM")}[version]
    config = getattr(transformers, cls[0])(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, attn_implementation="eager", **kw)
    hf = randomize(getattr(transformers, cls[1])(config))
    path = tmp_path / f"gemma{version}"
    hf.save_pretrained(path)
    return hf, str(path)


def our_logits(llm, ids):
    """A pure-text sequence: our decoder is exactly a causal LM (local layers see the last `window` keys)."""
    kind = torch.full(ids.shape, KIND_TEXT)
    masks = {"global": attention_mask(kind), "local": attention_mask(kind, window=llm.cfg.sliding_window)}
    return llm.logits(llm(llm.embed(ids), positions(kind), masks))


def load_ours(path):
    """What train.py --init_from gemma:DIR does: read the folder, build the config, load the decoder."""
    hf_cfg, tensors = unifluid.read_hf_folder(path)
    llm = Gemma(Config.preset("tiny", **gemma_config(hf_cfg)))
    load_gemma(llm, tensors)
    return llm.eval()


GEMMAS = {
    # Gemma-1: post_attention_layernorm is the pre-MLP norm, no sandwich, one RoPE base
    "gemma1": (1, {}),
    # Gemma-2: soft-capping small enough to bite, a query scale that is not head_dim, local/global alternating
    "gemma2": (2, dict(sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                       final_logit_softcapping=3.0)),
    # Gemma-3: QK-norm, local RoPE 10k vs global 1M, and a layer pattern that no global_every can express
    "gemma3": (3, dict(sliding_window=4, query_pre_attn_scalar=24,
                       layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"])),
}


@pytest.mark.parametrize("name", list(GEMMAS))
def test_gemma_logits_match_hugging_face(tmp_path, name):
    version, kw = GEMMAS[name]
    hf, path = save_gemma(tmp_path, version, **kw)
    llm = load_ours(path)
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        out = our_logits(llm, ids)
    err = (out - ref).abs().max().item()
    print(f"{name}: max abs logit error {err:.2e} (logit scale {ref.abs().max().item():.2f})")
    assert ref.abs().max() > 1.0 and err < 1e-4


def test_gemma_configs_become_our_fields(tmp_path):
    pytest.importorskip("transformers")
    _, path = save_gemma(tmp_path, 2, sliding_window=4)
    c2 = gemma_config(json.loads(open(os.path.join(path, "config.json")).read()))
    assert (c2["sliding_window"], c2["global_every"], c2["layer_pattern"], c2["attn_softcap"], c2["final_softcap"],
            c2["query_scale"], c2["qk_norm"], c2["sandwich_norm"]) == (4, 2, "", 50.0, 30.0, 256.0, False, True)
    old = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,  # transformers 4
               num_hidden_layers=12, num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=512,
               rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None)
    c3 = gemma_config(old)
    assert (c3["global_every"], c3["rope_base"], c3["rope_local_base"], c3["attn_softcap"]) == (6, 1e6, 1e4, 0.0)
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):    # Gemma-3 4B+ stretch global RoPE 8x
        gemma_config({**old, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    with pytest.raises(ValueError, match="not a Gemma text decoder"):
        gemma_config({**old, "model_type": "llama"})


def test_siglip_last_hidden_state_matches_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    hf = randomize(transformers.SiglipVisionModel(config))
    hf.save_pretrained(tmp_path / "siglip")
    hf_cfg, tensors = unifluid.read_hf_folder(str(tmp_path / "siglip"))
    model = UniFluid(Config.preset("tiny", **siglip_config(hf_cfg)))
    load_siglip(model, tensors, freeze=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1   # SigLIP's [-1, 1]
    with torch.no_grad():
        ref = hf(pixel_values=images).last_hidden_state
        out = model.vision(images)
    err = (out - ref).abs().max().item()
    print(f"siglip: max abs last-hidden-state error {err:.2e}")
    assert err < 1e-4
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.llm.parameters())


def test_a_checkpoint_that_does_not_match_names_what_is_wrong(tmp_path):
    pytest.importorskip("transformers")
    _, path = save_gemma(tmp_path, 2, sliding_window=4)
    hf_cfg, tensors = unifluid.read_hf_folder(path)
    llm = Gemma(Config.preset("tiny", **gemma_config(hf_cfg)))
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 32)
    broken["model.layers.9.mlp.up_proj.weight"] = torch.zeros(64, 32)
    with pytest.raises(ValueError) as e:
        load_gemma(llm, broken)
    msg = str(e.value)
    assert "missing (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected (1): model.layers.9.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.q_proj.weight (5, 32) (model expects (32, 32))" in msg
    # a Gemma-1 file is not a Gemma-2 model: its missing sandwich norms are named
    _, path1 = save_gemma(tmp_path, 1)
    with pytest.raises(ValueError, match="missing .*post_feedforward_layernorm"):
        load_gemma(llm, unifluid.read_hf_folder(path1)[1])


def test_sharded_checkpoints_are_read_through_their_index(tmp_path):
    pytest.importorskip("transformers")
    hf, path = save_gemma(tmp_path, 3, sliding_window=4)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 1
    a, b = unifluid.read_hf_folder(path)[1], unifluid.read_hf_folder(str(tmp_path / "sharded"))[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

# -----------------------------------------------------------------------------
# The Gemma tokenizer


def write_tokenizer(folder):
    """A tiny byte-level BPE tokenizer.json with Gemma's special tokens (ids 0-3 like Gemma's), VOCAB in all."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "<unused1>", "<unused2>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a small red circle above a blue square", "how many squares are there?"] * 20, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return os.path.join(folder, "tokenizer.json")


def test_gemma_tokenizer_round_trips_and_reloads_from_its_state(tmp_path):
    with open(write_tokenizer(tmp_path / "tok"), encoding="utf-8") as f:
        tok = GemmaTokenizer(f.read())
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.boi_id, tok.eoi_id) == (0, 1, 2, 4, 5)
    assert tok.vocab_size == VOCAB and len(tok.encode("\n")) == 1 and tok.sep_id == tok.encode("\n")[0]
    text = "a red circle above a blue square, ünïcode and 🙂 too"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode("a red circle"), tok.eos_id]) == "a red circle"   # specials hidden
    again = tokenizer_from_state(tok.state_dict())
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    assert GemmaTokenizer(tok.json_text, vocab_size=VOCAB + 20).vocab_size == VOCAB + 20   # padded embeddings


def test_train_starts_from_gemma_and_siglip_and_the_checkpoint_reloads(tmp_path):
    """train.py --init_from gemma:DIR --und_encoder siglip:DIR --freeze_und_encoder, two steps."""
    transformers = pytest.importorskip("transformers")
    from vae import AutoencoderKL, VAEConfig, save_vae
    hf, gemma_dir = save_gemma(tmp_path, 3, sliding_window=4)
    write_tokenizer(gemma_dir)
    siglip = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)))
    siglip.save_pretrained(tmp_path / "siglip")
    vae_path = str(tmp_path / "vae.pt")
    save_vae(AutoencoderKL(VAEConfig.preset("shapes", ch=8, norm_groups=4)), vae_path)
    out = tmp_path / "run"
    torch.set_num_threads(1)
    train.main(["--model", "tiny", "--batch_size", "8", "--max_steps", "2", "--warmup", "1", "--eval_interval", "1000",
                "--sample_interval", "1000", "--eval_n", "1", "--num_iter", "2", "--diffusion_steps", "2",
                "--vae", vae_path, "--out_dir", str(out), "--init_from", f"gemma:{gemma_dir}",
                "--und_encoder", f"siglip:{tmp_path / 'siglip'}", "--freeze_und_encoder"])
    model, _, tokenizer, ckpt = unifluid.load_checkpoint(str(out), ema=False)
    assert isinstance(tokenizer, GemmaTokenizer) and ckpt["tokenizer"]["kind"] == "gemma"
    assert model.cfg.qk_norm and model.cfg.d_model == 32 and model.cfg.vit_width == 32
    # the frozen ViT still holds SigLIP's weights; the decoder started from Gemma's and was trained
    assert torch.equal(model.vision.encoder.layers[0].mlp.fc1.weight, siglip.encoder.layers[0].mlp.fc1.weight)
    q = model.llm.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, hf.model.layers[0].self_attn.q_proj.weight)
    assert (q - hf.model.layers[0].self_attn.q_proj.weight).abs().max() < 0.05
    texts = model.generate_text(torch.zeros(1, 3, 32, 32), ["what color is the circle?"], max_new_tokens=3)
    assert isinstance(texts[0], str)


@pytest.mark.parametrize("argv, words", [
    (["--init_from", "gemma:/no/such/dir"], "no config.json there"),
    (["--und_encoder", "/some/dir"], "expected siglip:DIR"),
    (["--freeze_und_encoder", "--vit_pretrain", "0"], "needs --und_encoder siglip:DIR or --vit_pretrain"),
    (["--tokenizer", "sentencepiece"], "expected word, byte or gemma:DIR"),
])
def test_bad_pretrained_flags_are_one_clear_sentence(argv, words, capsys):
    with pytest.raises(SystemExit):
        train.get_args(argv)
    assert words in capsys.readouterr().err
