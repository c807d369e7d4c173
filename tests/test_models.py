"""Model loading: what MODEL may name, device/dtype rules, memory preflight, clear errors, generation."""
import json

import pytest
import torch

from common import models
from common.errors import LabError
from common.models import choose_dtype, load_model, resolve_model


def test_resolve_model_kinds(tmp_path, tiny_folders):
    assert resolve_model(None).kind == "embedded" and resolve_model(None).name == "smollm2-135m"
    assert resolve_model("gemma3-270m").kind == "embedded"
    assert resolve_model("Qwen/Qwen3-8B").kind == "hf"
    assert resolve_model("Qwen/Qwen3-8B").slug == "qwen-qwen3-8b"
    assert resolve_model(str(tiny_folders["llama"])).kind == "local"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    assert resolve_model(str(gguf)).kind == "gguf"


@pytest.mark.parametrize("spec, fragment", [
    ("", "MODEL is empty"),
    ("smollm3", "Unknown model 'smollm3'"),
    ("not a/valid id!", "not a model the lab knows"),
    ("./missing-folder", "does not exist"),
    ("/nowhere/model.gguf", "does not exist"),
])
def test_bad_model_names(spec, fragment):
    with pytest.raises(LabError, match=fragment):
        resolve_model(spec)


def test_corrupt_gguf_and_folder_without_config(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    with pytest.raises(LabError, match="not a GGUF file"):
        resolve_model(str(bad))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 8)
    with pytest.raises(LabError, match="Could not read"):
        load_model(str(truncated), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LabError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_hub_model_not_downloaded_while_offline():
    with pytest.raises(LabError, match="not downloaded and the Hugging Face Hub cannot be reached"):
        load_model("nobody-has/this-model-7b", "cpu")


def test_no_network_fails_fast_without_retries(monkeypatch):
    """Not offline mode, but no network: one sentence within seconds, and no download attempt (which would
    retry with backoff for ~40 s, printing a line per retry)."""
    import socket
    import time
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(address, timeout=None):
        assert timeout is not None and timeout <= 5
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", unreachable)

    def download(*args, **kwargs):
        raise AssertionError("tried to download without a network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    start = time.perf_counter()
    with pytest.raises(LabError, match="not downloaded and the Hugging Face Hub cannot be reached"):
        load_model("nobody-has/this-model-7b", "cpu")
    assert time.perf_counter() - start < 10


def test_gated_and_unknown_hub_ids_get_one_sentence(monkeypatch):
    import httpx
    from huggingface_hub import errors
    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co"))
    for error, fragment in [(errors.GatedRepoError("gated", response=response), "hf auth login"),
                            (errors.RepositoryNotFoundError("missing", response=response), "check the spelling")]:
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr("huggingface_hub.hf_hub_download", fail)
        with pytest.raises(LabError, match=fragment):
            load_model("meta-llama/Meta-Llama-3-8B", "cpu")


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig
    BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)
    with pytest.raises(LabError, match="cannot analyse"):
        load_model(str(tmp_path), "cpu")


def test_memory_preflight_stops_before_loading(monkeypatch, tiny_folders):
    monkeypatch.setattr(models, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(LabError, match="needs about .* GB in float32 but only .* is free on cpu"):
        load_model(str(tiny_folders["llama"]), "cpu")


def test_parameter_count_is_exact(tiny):
    assert models.parameter_count(tiny.config) == sum(p.numel() for p in tiny.hf_model.parameters())


def test_dtype_rules():
    assert choose_dtype("auto", "cpu", "llama") == torch.float32
    assert choose_dtype("auto", "mps", "llama") == torch.float16
    assert choose_dtype("auto", "cuda", "qwen3") == torch.float16
    assert choose_dtype("auto", "mps", "gemma2") == torch.bfloat16
    assert choose_dtype("float16", "cpu", "gemma2") == torch.float16


def test_unavailable_device_is_refused():
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(LabError, match="not available"):
        models.choose_device("mps")


def test_embedded_cache_is_reused(embedded_folder):
    assert (embedded_folder / "model.safetensors").exists()
    assert json.loads((embedded_folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    gguf = models.embedded_gguf_path("smollm2-135m")
    assert models.dequantized_folder(gguf) == embedded_folder  # no second conversion


def test_loaded_model_facts(embedded):
    assert (embedded.n_layers, embedded.d_model, embedded.n_heads, embedded.n_kv_heads) == (30, 576, 9, 3)
    assert embedded.has_chat_template and embedded.softcap is None


def test_cached_greedy_generation_matches_plain_hf(tiny):
    """The pitfall in DESIGN.md: KV-cached generation after boot_transformers must equal plain HF."""
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tiny.folder, dtype=torch.float32, attn_implementation="eager")
    ids = tiny.tokenizer("The capital of France is", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    expected = plain.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(tiny.hf_model.generate(ids, use_cache=True, **kwargs), expected)
