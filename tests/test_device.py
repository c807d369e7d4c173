"""The Mac path, driven on the CPU: the device check on every architecture, and each MPS-only branch.

No machine here has MPS, so every line that only runs there sits behind a small function, and these tests
drive those functions with torch's MPS calls replaced.
"""
import pytest
import torch

from common import errors, models
from common.models import check_device, load_model


def _one_note(notes):
    assert len(notes) == 1, notes
    return notes[0]


def test_device_check_passes_on_each_tiny_architecture(tiny):
    assert _one_note(check_device(tiny, "cpu")).startswith("CPU check passed: block")


def test_device_check_passes_on_the_embedded_models(embedded):
    assert _one_note(check_device(embedded, "cpu")).startswith("CPU check passed: block 0 ")
    # Gemma-3 alternates sliding (local rotary) and global layers: the check runs the first block of each.
    gemma = load_model("gemma3-270m", "cpu", "bfloat16")
    assert models.first_block_of_each_type(gemma.text_config) == [0, 5]
    assert _one_note(check_device(gemma, "cpu")).startswith("CPU check passed: blocks 0, 5 ")


def _break_block(model, index, change):
    """Make block `index` compute wrong numbers on the 'device' (a forward hook changing its output)."""
    def wrong(module, args, output):
        return (change(output[0]),) + tuple(output[1:]) if isinstance(output, tuple) else change(output)
    return model.hf_model.model.layers[index].register_forward_hook(wrong)


@pytest.mark.parametrize("change, expected", [
    (lambda h: h + 0.5, "CPU check WARNING: block 0 on cpu differs from the CPU"),
    (lambda h: h * float("nan"), "CPU check FAILED: the logits contain NaN or inf"),
])
def test_device_check_catches_wrong_numbers(tiny, change, expected):
    handle = _break_block(tiny, 0, change)
    try:
        assert _one_note(check_device(tiny, "cpu")).startswith(expected)
    finally:
        handle.remove()
    assert "passed" in _one_note(check_device(tiny, "cpu"))  # the reference block is the model's own, unbroken


def test_device_check_never_crashes(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")
    monkeypatch.setattr(models, "capture_block_calls", broken)
    note = _one_note(check_device(tiny, "cpu"))
    assert note.startswith("CPU check WARNING: the check itself failed (RuntimeError: no such kernel)")
    if not torch.backends.mps.is_available():  # here, moving anything to "mps" raises: a warning too
        assert _one_note(check_device(tiny, "mps")).startswith("MPS check WARNING: the check itself failed")


# ----------------------------------------------------------------------------- MPS-only branches, without MPS


def test_auto_picks_mps_when_present(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert models.choose_device("auto") == "mps" and models.choose_device("mps") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.choose_device("auto") == "cpu"


def test_mps_memory_is_capped_by_metals_working_set(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 1234)
    assert models.available_memory_bytes("mps") == 1234
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (5678, 10_000))
    assert models.available_memory_bytes("cuda") == 5678
    assert models.available_memory_bytes("cpu") > 1234


@pytest.mark.parametrize("device", ["mps", "cuda"])
def test_freeing_a_model_empties_the_device_cache(monkeypatch, device):
    emptied = []
    monkeypatch.setattr(getattr(torch, device), "empty_cache", lambda: emptied.append(device))
    models.LoadedModel(models.resolve_model(None), object(), None, device, torch.float16, "folder").free()
    assert emptied == [device]


def test_loading_on_mps_runs_the_check_and_names_the_fallback(tiny, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "check_device", lambda model, device: calls.append(device) or ["MPS check passed"])
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    on_mps = models.LoadedModel(tiny.source, tiny.hf_model, tiny.tokenizer, "mps", torch.float16, tiny.folder)
    notes = models.device_notes(on_mps)
    assert calls == ["mps"] and notes[0] == "MPS check passed" and "PYTORCH_ENABLE_MPS_FALLBACK=1" in notes[1]
    assert models.device_notes(tiny) == []  # the CPU needs no check


def test_the_fallback_is_set_before_torch_is_imported():
    import subprocess
    import sys
    code = "import os, sys; import common; assert 'torch' not in sys.modules; print(os.environ['PYTORCH_ENABLE_MPS_FALLBACK'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTORCH_ENABLE_MPS_FALLBACK"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(models.Path(__file__).resolve().parent.parent))
    assert done.stdout.strip() == "1", done.stderr


def test_a_missing_mps_operation_ends_in_one_line(capsys):
    error = NotImplementedError("The operator 'aten::foo' is not currently implemented for the MPS device.")
    errors._one_line_excepthook(NotImplementedError, error, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "PYTORCH_ENABLE_MPS_FALLBACK=1" in lines[0] and "--DEVICE=cpu" in lines[0]
