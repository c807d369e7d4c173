"""The lens in padded batches gives each prompt what it gives alone, on every architecture.

Batched and one-at-a-time numbers agree in float32 within 1e-5 of the values' scale (max(1, max |value|)),
not 1e-5 absolute: a batched matrix product adds its terms in another order than a single one. Measured on
SmolLM2: HF's own forward of 4 same-length prompts, no padding at all, moves logits near 28 by 2.4e-5
against one prompt at a time, and residuals reach ~24000 at a first token. On the tiny models the relative
gap is 3-4e-7; reading a row at a pad instead of its last real token is off by far more (tested below).
"""
import pytest
import torch

from common import lens
from common.prompts import encode

TEXTS = ["Hi", "The capital of France is", "One two three four five six seven eight nine ten eleven twelve",
         "The chemical symbol for gold is", "A",
         # longer than the tiny Gemma-2's sliding window (64): the window and the padding meet in one batch
         " ".join(["word"] * 80) + " end"]


def _largest_gap(model, prompts, batch_size):
    """(largest |batched - single| / max(1, scale) over resid and logits, the streams of both ways)."""
    single = [lens.residual_stream(model, p) for p in prompts]
    batched = lens.residual_streams(model, prompts, batch_size)
    gap = 0.0
    for (r1, l1), (r2, l2) in zip(single, batched):
        assert r2.shape == r1.shape == (model.n_layers + 1, model.d_model) and l2.shape == l1.shape
        for a, b in ((r1, r2), (l1, l2)):
            gap = max(gap, (a.double() - b.double()).abs().max().item() / max(1.0, a.abs().max().item()))
    return gap, single, batched


def test_batched_equals_single_in_float32(tiny):
    prompts = [encode(tiny, t) for t in TEXTS]
    gap, single, batched = _largest_gap(tiny, prompts, batch_size=4)
    assert gap <= 1e-5, tiny.config.architectures
    for resid, logits in batched:  # the lens invariant holds for every prompt of a batch
        assert lens.check_lens_matches_logits(tiny, resid[-1], logits)["passed"]
    assert lens.residual_streams(tiny, [], "auto") == [] and lens.sweeps(tiny, [], []) == []


def test_padding_is_what_a_wrong_reading_would_show(tiny):
    """The test can fail: reading a short prompt at the batch's last position (a pad) is far off."""
    short, long = encode(tiny, "Hi"), encode(tiny, "The capital of France is")
    alone = lens.residual_stream(tiny, short)[0]
    ids = torch.cat([short, torch.zeros(1, long.shape[1] - short.shape[1], dtype=torch.long)], dim=1)
    with torch.no_grad():
        at_pad = tiny.hf_model(torch.cat([ids, long]), output_hidden_states=True).hidden_states[1][0, -1]
    assert (at_pad - alone[1]).abs().max() > 1e-3  # layer 1: the residual after block 0


def test_batched_equals_single_on_embedded_models(embedded):
    from common.models import load_model
    for model in (embedded, load_model("gemma3-270m", "cpu", "float32")):
        prompts = [encode(model, t) for t in TEXTS]
        gap, _, batched = _largest_gap(model, prompts, batch_size="auto")
        assert gap <= 1e-5, model.name
        assert all(lens.check_lens_matches_logits(model, r[-1], lg)["passed"] for r, lg in batched)


def test_sweeps_equal_sweep(tiny):
    """The batched lens statistics match `sweep`, prompt by prompt and temperature by temperature."""
    prompts = [encode(tiny, t) for t in TEXTS]
    targets = [11, 200, 3000, 5, 42, 999]
    batched = lens.sweeps(tiny, prompts, targets, use_norm=True, top_k=3, temperatures=(0.5, 1.0), batch_size=2)
    for ids, target, by_temperature in zip(prompts, targets, batched):
        alone = lens.sweep(tiny, ids, target, True, 3, (0.5, 1.0))
        assert set(by_temperature) == {0.5, 1.0}
        for t, s in by_temperature.items():
            assert s.check["passed"] and s.target_rank == alone[t].target_rank
            for key in ("target_prob", "entropy", "kl_to_final"):
                assert getattr(s, key) == pytest.approx(getattr(alone[t], key), abs=1e-5), key
            assert [p for top in s.top_tokens for _, p in top] == pytest.approx(
                [p for top in alone[t].top_tokens for _, p in top], abs=1e-5)


def test_sweeps_in_unembedding_groups_and_raw_lens(tiny, monkeypatch):
    """Small unembedding groups (several per batch) and the RAW lens give the same statistics."""
    prompts = [encode(tiny, t) for t in TEXTS[:4]]
    whole = lens.sweeps(tiny, prompts, [1, 2, 3, 4], use_norm=False, batch_size=4)
    monkeypatch.setattr(lens, "UNEMBED_BYTES", 1)  # one prompt per unembedding call
    grouped = lens.sweeps(tiny, prompts, [1, 2, 3, 4], use_norm=False, batch_size=4)
    for a, b in zip(whole, grouped):
        assert a[1.0].target_prob == pytest.approx(b[1.0].target_prob, abs=1e-6)
        assert a[1.0].check["passed"]


def test_length_sorted_batches():
    prompts = [torch.zeros(1, n, dtype=torch.long) for n in (5, 2, 9, 2, 7)]
    assert lens.length_sorted_batches(prompts, 2) == [[1, 3], [0, 4], [2]]
    assert sorted(i for b in lens.length_sorted_batches(prompts, 10) for i in b) == list(range(5))
