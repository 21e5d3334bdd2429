"""pipeline.lm: real MiniLM weights and seeded random GPT-2 models, loaded offline."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, RandomModelConfig
from pipeline.generate.lm import ModelLoadError, load_language_model

TEXT = (
    "Return a new array of given shape and type, filled with zeros. The array is "
    "allocated lazily so that very large arrays cost nothing until they are written."
)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No hub access, and saeflow's cache (random models) in a temporary directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path_factory.getbasetemp() / "saeflow-cache"))


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return load_language_model(ModelConfig(name="minilm", device="cpu"))


def random_model(seed: int = 0, dtype: str = "float32"):
    return load_language_model(
        ModelConfig(name="random", random=RandomModelConfig(seed=seed, n_ctx=64), dtype=dtype, device="cpu")
    )


def test_minilm_metadata(minilm):
    assert (minilm.d_model, minilm.n_layers, minilm.n_ctx, minilm.d_vocab) == (384, 6, 512, 30522)
    assert (minilm.bos_id, minilm.eos_id, minilm.pad_id) == (101, 102, 0)
    assert not minilm.is_causal and not minilm.has_lm_head
    info = minilm.describe()
    assert info["tokenizer"]["bos_id"] == 101 and info["d_model"] == 384 and info["dtype"] == "float32"


def test_minilm_resid_matches_hf_hidden_states(minilm):
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(minilm.source).eval()
    ids = torch.tensor([[minilm.bos_id, *minilm.encode([TEXT])[0], minilm.eos_id]])
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True).hidden_states[4]
    got = minilm.run_hooks(ids, ["blocks.3.hook_resid_post"])["blocks.3.hook_resid_post"]
    assert got.shape == (1, ids.shape[1], 384)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_minilm_attention_mask_hides_padding(minilm):
    """A padded short row must give the activations of the same row without padding."""
    short = torch.tensor([[101, *minilm.encode(["zeros and ones"])[0], 102]])
    long = torch.tensor([[101, *minilm.encode([TEXT])[0], 102]])
    padded = torch.zeros(2, long.shape[1], dtype=torch.long)
    padded[0, : short.shape[1]] = short[0]
    padded[1] = long[0]
    mask = (torch.arange(long.shape[1]) < torch.tensor([[short.shape[1]], [long.shape[1]]])).long()
    hook = "blocks.2.hook_resid_post"
    batch = minilm.run_hooks(padded, [hook], attention_mask=mask)[hook]
    alone = minilm.run_hooks(short, [hook])[hook]
    torch.testing.assert_close(batch[0, : short.shape[1]], alone[0], atol=1e-4, rtol=1e-4)


def test_encode_does_not_truncate(minilm):
    from transformers import AutoTokenizer

    text = " ".join(f"parameter{i} of the function" for i in range(250))
    ids = minilm.encode([text, "short"])
    assert len(ids[0]) > 1000  # MiniLM's tokenizer.json alone would cut at 128
    assert {minilm.bos_id, minilm.eos_id, minilm.pad_id}.isdisjoint(ids[0])
    reference = AutoTokenizer.from_pretrained(minilm.source)
    assert ids == reference([text, "short"], add_special_tokens=False, truncation=False)["input_ids"]


def test_unknown_hook_lists_valid_names(minilm):
    with pytest.raises(ModelLoadError, match=r"did you mean 'blocks.0.hook_resid_post'.*blocks.5.hook_resid_post"):
        minilm.hook_dims(["blocks.0.hook_resdi_post"])
    with pytest.raises(ModelLoadError, match="unknown hook point 'blocks.9.hook_resid_post'"):
        minilm.run_hooks(torch.tensor([[101, 102]]), ["blocks.9.hook_resid_post"])
    with pytest.raises(ModelLoadError, match="prediction head"):  # MiniLM has no trained head
        minilm.hook_dims(["ln_final.hook_normalized"])


def test_stop_layer(minilm):
    assert minilm.stop_layer(["blocks.0.hook_resid_post", "blocks.3.hook_mlp_out"]) == 4
    assert minilm.stop_layer(["blocks.5.attn.hook_z"]) == 6
    assert minilm.stop_layer(["hook_embed"]) == 1
    assert minilm.stop_layer(["blocks.1.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_too_long_sequence_is_refused(minilm):
    with pytest.raises(ModelLoadError, match="context_size <= 512"):
        minilm.run_hooks(torch.zeros(1, 513, dtype=torch.long), ["blocks.0.hook_resid_post"])


def test_random_model_is_deterministic_per_seed(monkeypatch, tmp_path):
    tokens = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]
    rng_before = torch.get_rng_state()
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "a"))
    first = random_model(seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building must not reseed the caller
    monkeypatch.setenv("SAEFLOW_CACHE", str(tmp_path / "b"))  # a fresh build, not the cached one
    second = random_model(seed=0)
    assert first.source != second.source
    other = random_model(seed=1)
    a, b, c = (model.run_hooks(tokens, hooks) for model in (first, second, other))
    for hook in hooks:
        assert torch.equal(a[hook], b[hook])
        assert not torch.allclose(a[hook], c[hook])
    with torch.inference_mode():  # eval mode: no dropout, logits repeat exactly
        assert torch.equal(first.model(tokens), first.model(tokens))
    assert first.is_causal and first.has_lm_head
    assert (first.bos_id, first.eos_id, first.pad_id) == (101, 102, 0)
    assert first.describe()["random"]["seed"] == 0


def test_random_model_hook_dims_and_dtype():
    model = random_model()
    dims = model.hook_dims(["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post", "blocks.0.attn.hook_z", "ln_final.hook_normalized"])
    assert dims == {"blocks.1.hook_resid_post": 64, "blocks.0.mlp.hook_post": 256, "blocks.0.attn.hook_z": 64, "ln_final.hook_normalized": 64}
    tokens = torch.randint(1000, 30000, (1, 8), generator=torch.Generator().manual_seed(1))
    full = model.run_hooks(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    half = random_model(dtype="bfloat16")
    low = half.run_hooks(tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert low.dtype == torch.bfloat16 and half.describe()["dtype"] == "bfloat16"
    torch.testing.assert_close(low.float(), full, atol=0.1, rtol=0.05)


def test_random_model_rejects_bad_heads():
    with pytest.raises(ModelLoadError, match="not divisible by n_heads"):
        load_language_model(ModelConfig(name="random", random=RandomModelConfig(d_model=64, n_heads=3), device="cpu"))


def test_hub_name_offline_and_missing_directory():
    with pytest.raises(ModelLoadError, match="model nonexistent-org/no-such-model is not available offline"):
        load_language_model(ModelConfig(name="nonexistent-org/no-such-model", device="cpu"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_language_model(ModelConfig(name="./no/such/model-dir", device="cpu"))


def test_local_directory_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_language_model(ModelConfig(name=str(tmp_path), device="cpu"))
