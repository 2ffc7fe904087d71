"""Model loading: every source, and a one-line error for each way it can go wrong."""


import pytest
from transformers import MambaConfig, MambaForCausalLM

from attnsparse.core.models import ModelShape, check_backend_support, describe, embedded_gguf, load_model
from attnsparse.core.tiny import save_tiny, tiny_gpt2, tiny_llama
from attnsparse.errors import AttnsparseError


def test_local_directory_loads_and_is_supported(tmp_path):
    save_tiny(str(tmp_path / "tiny"), tiny_llama(heads=6, kv_heads=2))
    loaded = load_model(str(tmp_path / "tiny"))
    assert loaded.source == "directory" and loaded.max_context == 512
    facts = describe(loaded.model)
    assert (facts["layers"], facts["query_heads"], facts["kv_heads"], facts["head_dim"]) == (2, 6, 2, 8)


def test_model_shape_reads_every_architecture_naming():
    """Llama names (GQA, explicit head_dim), GPT-2 names (n_layer, n_head, n_embd), and a config without heads."""
    llama = ModelShape.of(tiny_llama(layers=3, heads=6, kv_heads=2, head_dim=8, max_positions=256))
    assert (llama.layers, llama.heads, llama.kv_heads, llama.head_dim, llama.max_context) == (3, 6, 2, 8, 256)
    gpt2 = tiny_gpt2(layers=2, heads=4, hidden=32, max_positions=128)
    for shape in (ModelShape.of(gpt2), ModelShape.of(gpt2.config)):
        assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim, shape.max_context) == (2, 4, 4, 8, 128)
    mamba = ModelShape.of(MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4))
    assert mamba.layers == 2 and mamba.heads is None and mamba.kv_heads is None
    with pytest.raises(AttnsparseError, match="^MambaConfig config states no attention head count$"):
        mamba.need("heads")


def test_missing_path_is_named():
    with pytest.raises(AttnsparseError, match="model path ./no/such/model does not exist"):
        load_model("./no/such/model")


def test_corrupt_gguf_is_reported(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(AttnsparseError, match="cannot read GGUF file .*corrupt or truncated"):
        load_model(str(bad))


def test_truncated_embedded_gguf_is_reported(tmp_path):
    truncated = tmp_path / "smollm2.gguf"
    with embedded_gguf().open("rb") as whole:  # cut inside the vocabulary: parsing all of it would take seconds
        truncated.write_bytes(whole.read(400_000))
    with pytest.raises(AttnsparseError, match="corrupt or truncated"):
        load_model(str(truncated))


def test_truncated_safetensors_is_reported(tmp_path):
    directory = tmp_path / "tiny"
    save_tiny(str(directory))
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(AttnsparseError, match="corrupt or truncated"):
        load_model(str(directory))


def test_directory_without_config_is_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttnsparseError, match="has no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unreachable_hub_suggests_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported: patch the constant too,
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # or a hanging network takes a minute
    with pytest.raises(AttnsparseError, match="hub.*pass a local model directory"):
        load_model("some-org/some-model-that-is-not-cached")


def test_unreachable_hub_fails_fast_with_one_request(unreachable_hub):
    """Hub down, online mode: one probe request, then the cache only; no retry loop, and HF_HUB_OFFLINE named."""
    with pytest.raises(AttnsparseError) as caught:
        load_model("nope/model")
    assert unreachable_hub == {"requests": 1, "sleeps": 0}
    message = str(caught.value)
    assert "\n" not in message and "unreachable" in message and "HF_HUB_OFFLINE=1" in message
    assert "pass a local model directory" in message


def test_architecture_without_attention_interface_is_detected():
    """A state-space model has no attention calls at all; the probe forward notices."""
    config = MambaConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4)
    with pytest.raises(AttnsparseError, match="only 0 of 2 layers route attention"):
        check_backend_support(MambaForCausalLM(config).eval())


def test_layer_computing_attention_itself_is_detected():
    """A model whose second layer bypasses the interface is refused, whatever its class name says."""
    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    original = attention.forward

    def private_forward(hidden_states, position_embeddings, attention_mask=None, **kwargs):
        attention.config._attn_implementation_internal = "eager"
        try:
            return original(hidden_states, position_embeddings, attention_mask, **kwargs)
        finally:
            attention.config._attn_implementation_internal = "attnsparse"

    attention.forward = private_forward
    with pytest.raises(AttnsparseError, match="only 1 of 2 layers"):
        check_backend_support(model)
    check_backend_support(tiny_gpt2())


def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch, smollm2):
    cached = load_model("smollm2-135m", probe=False)
    assert cached.source == "embedded-cache" and cached.max_context == 8192
    facts = describe(cached.model)
    assert (facts["layers"], facts["query_heads"], facts["kv_heads"], facts["head_dim"]) == (30, 9, 3, 64)


def test_a_cache_entry_saved_meanwhile_by_another_process_is_kept(tmp_path):
    """Two first uses convert at once (parallel test workers, two jobs): the second to finish keeps the first's
    complete directory, which the other process may be reading, instead of deleting it; an explicit save replaces."""
    from attnsparse.core.models import save_atomically

    loaded = load_model(save_tiny(str(tmp_path / "tiny"), tiny_llama()))
    target = tmp_path / "cache" / "model"
    save_atomically(loaded.model, loaded.tokenizer, target)
    marker = target / "written-first"
    marker.write_text("")
    save_atomically(loaded.model, loaded.tokenizer, target, replace=False)
    assert marker.is_file() and sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging left
    save_atomically(loaded.model, loaded.tokenizer, target)
    assert not marker.exists() and (target / "config.json").is_file()
