"""The tuned lens: identity at start, the last layer is the model, training helps on held-out text, caching."""
import json

import pytest
import torch

from common import lens, tuned_lens
from common.prompts import encode
from conftest import run_folders, run_script

# Small enough for a test on a tiny random model: a few seconds.
SMALL = tuned_lens.TunedLensSettings(train_tokens=512, heldout_tokens=128, seq_len=32, epochs=2, batch_tokens=32,
                                     lr=1e-2)


def test_untrained_tuned_lens_is_the_norm_lens(tiny):
    ids = encode(tiny, "The capital of France is")
    resid, _ = lens.residual_stream(tiny, ids)  # [n_layers + 1, d_model]
    untrained = tuned_lens.TunedLens(tiny.n_layers, tiny.d_model)
    with torch.no_grad():
        tuned = untrained.sweep_logits(tiny, resid)
    norm = lens.unembed(tiny, resid, use_norm=True)
    assert tuned.shape == norm.shape == (tiny.n_layers + 1, tiny.config.vocab_size)
    assert torch.allclose(tuned, norm, rtol=1e-5, atol=1e-5)  # one layer at a time vs all at once: rounding only


def test_last_layer_is_the_model_even_with_nonzero_translators(tiny):
    """The last layer has no translator: whatever the others hold, it reproduces the model's logits."""
    ids = encode(tiny, "The capital of France is")
    translated = tuned_lens.TunedLens(tiny.n_layers, tiny.d_model)
    with torch.no_grad():
        for translator in translated.translators:
            translator.weight.normal_(0, 0.1)
            translator.bias.normal_(0, 1.0)
    sweep = tuned_lens.tuned_sweep(tiny, translated, ids, target_id=0)
    assert sweep.check["passed"] and sweep.check["max_abs_diff"] <= 1e-4, sweep.check
    resid, _ = lens.residual_stream(tiny, ids)
    with torch.no_grad():
        moved = translated.logits(tiny, resid[1], 1)
    assert (moved - lens.unembed(tiny, resid[1], True)).abs().max() > 1e-2  # the translators do act elsewhere
    assert len(sweep.layer_records()) == tiny.n_layers + 1
    assert all(check["passed"] for check in sweep.checks), sweep.checks  # its KL and ranks recomputed


def test_kl_to_final_matches_the_lens_metrics():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    kl = tuned_lens.kl_to_final(logits[-1:].expand(4, 50), logits)
    assert torch.allclose(kl, lens.lens_metrics(logits, target_id=0)["kl_to_final"], atol=1e-5)


def test_heldout_split_is_disjoint():
    train, heldout = tuned_lens.split_heldout(list(range(23)))
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == list(range(23)) and heldout
    train_starts, heldout_starts = tuned_lens.split_heldout(tuned_lens.STARTS)
    assert set(train_starts).isdisjoint(heldout_starts)


@pytest.fixture(scope="module")
def llama(tiny_folders):
    from common.models import load_model
    return load_model(str(tiny_folders["llama"]), "cpu", "float32")


@pytest.fixture(scope="module")
def small_trained(llama):
    return tuned_lens.train_tuned_lens(llama, SMALL)


def test_training_lowers_heldout_kl(llama, small_trained):
    trained = small_trained
    norm, tuned = trained.heldout_kl["norm"], trained.heldout_kl["tuned"]
    assert len(norm) == len(tuned) == llama.n_layers + 1
    assert trained.n_tokens == 512 and trained.n_heldout_tokens == 128
    assert norm[-1] == tuned[-1] == 0.0
    # The held-out text never was trained on; the tuned lens must still be closer to the final layer.
    assert all(t < n for t, n in zip(tuned[:-1], norm[:-1])), (norm, tuned)


def test_cache_round_trip_and_damaged_file(llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    settings = tuned_lens.TunedLensSettings(**{**SMALL.__dict__, "train_tokens": 128, "heldout_tokens": 32,
                                               "epochs": 1})
    first = tuned_lens.load_or_train(llama, settings)
    path = tuned_lens.cache_path(llama, settings)
    assert first.path == path and path.is_file() and str(tmp_path) in str(path)

    again = tuned_lens.load_or_train(llama, settings)  # read back, not retrained
    assert again.heldout_kl == first.heldout_kl and again.trained_on == first.trained_on
    for a, b in zip(first.lens.state_dict().values(), again.lens.state_dict().values()):
        assert torch.equal(a, b)
    assert "retraining" not in capsys.readouterr().err

    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    retrained = tuned_lens.load_or_train(llama, settings)
    notice = [line for line in capsys.readouterr().err.splitlines() if "retraining" in line]
    assert len(notice) == 1 and "damaged" in notice[0]
    for name in ("norm", "tuned"):  # same seed, same corpus: the same lens
        assert retrained.heldout_kl[name] == pytest.approx(first.heldout_kl[name], rel=1e-4, abs=1e-6)
    tuned_lens.load(llama, path, tuned_lens.cache_key(llama, settings))  # the new entry is whole


def test_cache_key_changes_with_settings_and_model(llama, tiny):
    other = tuned_lens.TunedLensSettings(**{**SMALL.__dict__, "lr": 2e-2})
    assert tuned_lens.cache_path(llama, SMALL) != tuned_lens.cache_path(llama, other)
    if tiny.folder != llama.folder:
        assert tuned_lens.cache_path(llama, SMALL) != tuned_lens.cache_path(tiny, SMALL)


def test_too_few_tokens_is_a_clear_error(llama):
    from common.errors import LabError
    with pytest.raises(LabError, match="training tokens"):
        tuned_lens.choose_token_counts(llama, tuned_lens.TunedLensSettings(train_tokens=10, seq_len=64))


def test_001_reports_the_tuned_lens(llama, small_trained, tiny_folders, tmp_path, monkeypatch):
    """001 with USE_TUNED_LENS=True on a tiny model, its lens put in the cache first (no 10-minute training)."""
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "cache"))  # run_script passes the environment on
    defaults = tuned_lens.TunedLensSettings()
    tuned_lens.save(small_trained, tuned_lens.cache_path(llama, defaults), tuned_lens.cache_key(llama, defaults))
    out = tmp_path / "runs"
    result = run_script("001_layers_and_logits/run.py", f"--OUT_DIR={out}", f"--MODEL={tiny_folders['llama']}",
                        "--USE_TUNED_LENS=True", "--PROMPT_FORMAT=completion", "--PARAPHRASES=False",
                        "--DIRECTION_PROBES=False", "--TEMPERATURES=[1.0]", "--FACTS=8")
    assert result.returncode == 0, result.stderr
    assert "retraining" not in result.stderr and "sampling text" not in result.stderr  # read from the cache
    (folder,) = run_folders(out)
    results = json.loads((folder / "results.json").read_text())
    n = results["n_layers"]
    assert results["tuned_lens"]["n_tokens"] == small_trained.n_tokens
    assert isinstance(results["tuned_lens"]["trained_on"], str)
    assert results["tuned_lens"]["heldout_kl"] == small_trained.heldout_kl
    for prompt in results["prompts"]:
        tuned, norm = prompt["tuned_layers"], prompt["layers"]
        assert [layer["layer"] for layer in tuned] == list(range(n + 1)) and set(tuned[0]) == set(norm[0])
        assert tuned[-1]["target_prob"] == pytest.approx(norm[-1]["target_prob"], rel=1e-4)  # no translator
        assert prompt["tuned_self_check"]["passed"]
    report = (folder / "report.md").read_text()
    assert "## Tuned lens beside the NORM lens" in report and "PASS: tuned lens at the last layer" in report
    assert {"tuned_heldout_kl.png", "tuned_target_prob_heatmap.png", "tuned_top_token_heatmap.png"} <= {
        p.name for p in folder.iterdir()}
