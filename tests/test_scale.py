"""Issue 10, ready for 7-9B models: streamed GGUF conversion, its cache, offloading, batch sizes, stand-ins."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_folders, run_script


@pytest.fixture(scope="module")
def tiny_gguf(tiny_folders, tmp_path_factory):
    """The tiny Llama written as a Q8_0 GGUF, as llama.cpp lays it out."""
    from common.standins import write_llama_gguf
    return write_llama_gguf(tiny_folders["llama"], tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _transformers_gguf_state(gguf, dtype):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model.state_dict()


def _converted_state(folder):
    from safetensors.torch import load_file
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(file))
    return state


@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_streamed_conversion_equals_transformers_gguf_loading(tiny_gguf, cache, dtype_name):
    from common.models import dequantized_folder
    converted = _converted_state(dequantized_folder(tiny_gguf, dtype_name=dtype_name))
    reference = _transformers_gguf_state(tiny_gguf, getattr(torch, dtype_name))
    assert set(converted) == set(reference) - {"lm_head.weight"} | ({"lm_head.weight"} & set(converted))
    for name, tensor in converted.items():
        assert tensor.dtype == getattr(torch, dtype_name), name
        assert torch.equal(tensor, reference[name]), name


def test_streamed_conversion_undoes_llama_cpp_permutation(tiny_gguf, tiny_folders, cache):
    """Round trip: the converted q/k weights equal the original model's within Q8_0 rounding."""
    from safetensors.torch import load_file
    from common.models import dequantized_folder
    converted = _converted_state(dequantized_folder(tiny_gguf, dtype_name="float32"))
    original = load_file(tiny_folders["llama"] / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        scale = original[name].abs().max()
        assert (converted[name] - original[name]).abs().max() < 0.02 * scale, name


def test_embedded_conversion_equals_transformers(embedded_folder):
    """SmolLM2 (Q4_1) converted by streaming == transformers' own GGUF loading, float32, every tensor."""
    from common.models import embedded_gguf_path
    reference = _transformers_gguf_state(embedded_gguf_path("smollm2-135m"), torch.float32)
    converted = _converted_state(embedded_folder)
    assert len(converted) == 272
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference[name]), name


@pytest.mark.skipif(not os.environ.get("LAB_SLOW_TESTS"), reason="Gemma-3's conversion takes minutes: LAB_SLOW_TESTS=1")
def test_embedded_gemma3_conversion_equals_transformers():
    from common.models import EMBEDDED_MODELS, dequantized_folder, embedded_gguf_path
    gguf = embedded_gguf_path("gemma3-270m")
    converted = _converted_state(dequantized_folder(gguf, EMBEDDED_MODELS["gemma3-270m"].architecture))
    reference = _transformers_gguf_state(gguf, torch.float32)
    for name, tensor in converted.items():
        assert torch.equal(tensor, reference[name]), name


def test_cache_is_keyed_by_content_not_path(tiny_gguf, cache, tmp_path, capsys):
    from common.models import dequantized_folder
    first = dequantized_folder(tiny_gguf, dtype_name="float16")
    assert "Converting" in capsys.readouterr().err
    elsewhere = tmp_path / "second-clone" / "renamed.gguf"
    elsewhere.parent.mkdir()
    shutil.copy(tiny_gguf, elsewhere)
    os.utime(elsewhere, (1, 1))  # another time too
    assert dequantized_folder(elsewhere, dtype_name="float16") == first
    assert "Converting" not in capsys.readouterr().err
    assert len([p for p in (cache / "converted-v1").iterdir() if p.is_dir()]) == 1


def test_interrupted_or_corrupt_conversion_leaves_no_cache_entry(tiny_gguf, cache, tmp_path, monkeypatch):
    from common import gguf_convert
    from common.errors import LabError
    from common.models import dequantized_folder

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(gguf_convert, "_write_tensor", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dequantized_folder(tiny_gguf, dtype_name="float16")
    assert not [p for p in (cache / "converted-v1").iterdir() if p.is_dir()]
    monkeypatch.undo()
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(LabError) as error:
        dequantized_folder(broken, dtype_name="float16")
    assert "\n" not in str(error.value) and "corrupt" in str(error.value)
    assert not [p for p in (cache / "converted-v1").iterdir() if p.is_dir()]


def test_two_runs_converting_the_same_file_at_once_keep_the_first_finished(tiny_gguf, cache, monkeypatch):
    """Two experiments started together on first use both convert: the one finishing second finds the complete
    folder of the first, keeps it (its files may be loading already) and drops its own copy."""
    from common import gguf_convert
    from common.models import converted_cache_folder, dequantized_folder
    folder = converted_cache_folder(tiny_gguf, "float16")
    real_move = gguf_convert._move_into_place

    def other_run_finishes_first(tmp, target):
        shutil.copytree(tmp, target)  # the other run's complete folder appears first
        (target / "marker").write_text("first")
        real_move(tmp, target)
    monkeypatch.setattr(gguf_convert, "_move_into_place", other_run_finishes_first)
    assert dequantized_folder(tiny_gguf, dtype_name="float16") == folder
    assert (folder / "marker").read_text() == "first" and (folder / "config.json").exists()
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [folder.name]  # no .tmp- left


def test_storage_dtype_rule():
    from common.gguf_convert import storage_dtype_name
    families = ("gemma2", "gemma3_text")
    assert storage_dtype_name("llama", torch.float32, 135_000_000, families) == "float32"
    assert storage_dtype_name("llama", torch.float32, 8_000_000_000, families) == "float16"
    assert storage_dtype_name("llama", torch.float16, 135_000_000, families) == "float16"
    assert storage_dtype_name("gemma2", torch.bfloat16, 9_000_000_000, families) == "bfloat16"


def _half_the_layers_gb(folder):
    """A MAX_MEMORY_GB that keeps the embeddings, norm, unembedding and half the layers on the device."""
    from transformers import AutoConfig
    from common.models import module_sizes
    sizes = module_sizes(AutoConfig.from_pretrained(folder), torch.float32)
    fixed = sum(sizes[name] for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"))
    return (fixed + sizes["model.layers.0"] + sizes["model.layers.1"] + 1) / 1e9


def test_offloaded_model_matches_in_memory(tiny_folders, cache):
    from common.models import load_model
    folder = str(tiny_folders["llama"])
    plain = load_model(folder, "cpu", "float32")
    offloaded = load_model(folder, "cpu", "float32", max_memory_gb=_half_the_layers_gb(folder))
    assert any("Offloaded: 2 of 4 layers" in note and "disk" in note for note in offloaded.notes)
    assert str(offloaded.hf_model.model.layers[3].mlp.down_proj.weight.device) == "meta"  # really on disk
    ids = plain.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = plain.hf_model(ids).logits
        assert (offloaded.hf_model(ids).logits - expected).abs().max() <= 1e-5
        # The TransformerBridge boots on the offloaded model: its logits and hooks work too.
        logits, cache_ = offloaded.bridge.run_with_cache(ids)
        assert (logits - expected).abs().max() <= 1e-5
        assert cache_["blocks.3.hook_resid_post"].shape[-1] == offloaded.d_model


def test_001_and_004_offloaded_give_the_same_numbers(tiny_folders, tmp_path):
    folder = str(tiny_folders["llama"])
    cap = f"--MAX_MEMORY_GB={_half_the_layers_gb(folder)}"
    for script, args in [("001_layers_and_logits/run.py", ["--PROMPT_FORMAT=completion", "--PARAPHRASES=False", "--FACTS=8",
                                                           "--DIRECTION_PROBES=False"]),
                         ("004_activation_patching/run.py", ["--SITES=resid", "--METHOD=exact",
                                                              "--NOISE_TRACING=False"])]:
        results = []
        for extra in ([], [cap]):
            out = tmp_path / script.split("/")[0] / str(len(extra))
            done = run_script(script, f"--MODEL={folder}", f"--OUT_DIR={out}", "--DEVICE=cpu", "--DTYPE=float32",
                              *args, *extra, timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
            assert ("Offloaded" in done.stderr) == bool(extra)
            results.append(json.loads((run_folders(out)[0] / "results.json").read_text()))
        assert _numbers(results[0]) == pytest.approx(_numbers(results[1]), abs=1e-5), script


def _numbers(value) -> list:
    """Every number in a results.json, in order."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_embedded_001_offloaded_at_0_2_gb(tmp_path, embedded_folder):
    done = run_script("001_layers_and_logits/run.py", "--MODEL=smollm2-135m", "--MAX_MEMORY_GB=0.2",
                      "--PROMPT_FORMAT=completion", "--PARAPHRASES=False", "--DIRECTION_PROBES=False", "--FACTS=8",
                      "--DEVICE=cpu", f"--OUT_DIR={tmp_path}", timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Offloaded:" in done.stderr and "disk" in done.stderr
    folder = run_folders(tmp_path)[0]
    report = (folder / "report.md").read_text()
    assert "Offloaded" in report and "- PASS" in report and "FAIL" not in report  # 001's self-checks pass
    assert "Offloaded" in json.dumps(json.loads((folder / "config.json").read_text()))


def test_preflight_says_how_to_run_offloaded(tiny, monkeypatch):
    from common import models
    from common.errors import LabError
    monkeypatch.setattr(models, "available_memory_bytes", lambda device: 1000)
    with pytest.raises(LabError, match="--MAX_MEMORY_GB="):
        models.preflight_memory(tiny.config, torch.float32, "cpu", "tiny")
    assert models.preflight_memory(tiny.config, torch.float32, "cpu", "tiny", max_memory_gb=0.001) > 0


def test_auto_batch_size_follows_memory_and_shapes(tiny):
    from common.batching import auto_batch_size, batch_size
    config = tiny.config
    assert batch_size(7, tiny, 10) == 7
    roomy = auto_batch_size(config, torch.float32, 10, free_bytes=10**11, weight_bytes=10**11)
    assert roomy == 1024 // 10  # capped by tokens per forward
    assert auto_batch_size(config, torch.float32, 10, free_bytes=0, weight_bytes=0) >= 1
    long = auto_batch_size(config, torch.float32, 1000, free_bytes=10**9, weight_bytes=10**9)
    assert 1 <= long <= 1  # 1000 tokens: one sequence per forward
    assert batch_size("auto", tiny, 10) >= 1


@pytest.mark.parametrize("arg", ["--BATCH_SIZE=0", "--BATCH_SIZE=many", "--MAX_MEMORY_GB=-1", "--MAX_MEMORY_GB=lots"])
def test_bad_batch_size_or_memory_cap_stops_before_loading(arg):
    done = run_script("004_activation_patching/run.py", arg, timeout=60)
    assert done.returncode == 2 and arg.split("=")[0][2:] in done.stderr.splitlines()[-1]


def test_standin_is_deterministic_in_its_dtype_with_fewer_layers(tmp_path, tiny_folders):
    from safetensors.torch import load_file
    from common.standins import build_standin, seed_config
    config_file = tmp_path / "gemma2.json"
    config_file.write_text((tiny_folders["gemma2"] / "config.json").read_text())
    a = build_standin(str(config_file), tmp_path / "a", "bfloat16", n_layers=2, seed=3)
    b = build_standin(str(config_file), tmp_path / "b", "bfloat16", n_layers=2, seed=3)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in wa.values())
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((a / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 64 and config["vocab_size"] == 49152
    for name in ("qwen3-8b", "meta-llama-3-8b", "mistral-7b-v0.1", "gemma-2-9b"):
        assert seed_config(name, 2).num_hidden_layers == 2
