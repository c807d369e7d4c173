"""The logit lens: its invariant on every architecture, its layers, and its metrics against numpy."""
import numpy as np
import pytest
import torch

from common import lens
from common.prompts import encode


def test_norm_lens_at_last_layer_equals_logits(tiny):
    ids = encode(tiny, "The capital of France is")
    resid, logits = lens.residual_stream(tiny, ids)
    assert resid.shape == (tiny.n_layers + 1, tiny.d_model)
    check = lens.check_lens_matches_logits(tiny, resid[-1], logits)
    assert check["passed"], check
    assert check["max_abs_diff"] <= 1e-4


def test_lens_check_reads_the_reported_row(tiny):
    """Given the sweep's own NORM row, the invariant checks that row: the right one passes, a RAW row fails."""
    ids = encode(tiny, "The capital of France is")
    resid, logits = lens.residual_stream(tiny, ids)
    norm_rows, raw_rows = lens.unembed(tiny, resid, use_norm=True), lens.unembed(tiny, resid, use_norm=False)
    assert lens.check_lens_matches_logits(tiny, resid[-1], logits, norm_rows[-1])["passed"]
    assert not lens.check_lens_matches_logits(tiny, resid[-1], logits, raw_rows[-1])["passed"]
    assert lens.sweep(tiny, ids, 0, use_norm=False)[1.0].check["passed"]  # RAW sweeps unembed the NORM row apart


def test_norm_lens_on_embedded_model(embedded):
    ids = encode(embedded, "The capital of France is")
    result = lens.sweep(embedded, ids, target_id=0)[1.0]
    assert result.check["passed"] and result.check["max_abs_diff"] <= 1e-4


def test_lens_layers_match_the_bridge_hooks(tiny):
    """Layer 0 = blocks.0.hook_resid_pre (embeddings after scaling), layer i = blocks.{i-1}.hook_resid_post."""
    ids = encode(tiny, "One two three four five")
    resid, logits = lens.residual_stream(tiny, ids)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(tiny.n_layers)]
    with torch.no_grad():
        bridge_logits, cache = tiny.bridge.run_with_cache(ids, names_filter=lambda name: name in names)
    for layer, name in enumerate(names):
        assert torch.allclose(resid[layer], cache[name][0, -1], atol=1e-4), name
    assert torch.allclose(logits, bridge_logits[0, -1], atol=1e-4)


def test_raw_lens_skips_the_final_norm(tiny):
    ids = encode(tiny, "Hello world")
    resid, _ = lens.residual_stream(tiny, ids)
    raw = lens.unembed(tiny, resid, use_norm=False)
    norm = lens.unembed(tiny, resid, use_norm=True)
    assert raw.shape == norm.shape == (tiny.n_layers + 1, tiny.config.vocab_size)
    assert not torch.allclose(raw, norm)


def test_gemma2_softcap_is_part_of_the_unembedding(tiny):
    if tiny.softcap is None:
        pytest.skip("only Gemma-2 has a final soft-cap")
    ids = encode(tiny, "The capital of France is")
    resid, logits = lens.residual_stream(tiny, ids)
    uncapped = tiny.unembedding(tiny.final_norm(resid[-1])).float()
    assert uncapped.abs().max() > tiny.softcap  # the test model reaches the cap, so capping matters
    assert (uncapped - logits).abs().max() > 1.0
    assert (lens.unembed(tiny, resid[-1], True) - logits).abs().max() <= 1e-4


def _numpy_metrics(logits: np.ndarray, target: int):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    entropy = np.array([-sum(x * np.log(x) for x in row if x > 0) for row in p])
    kl = np.array([sum(a * (np.log(a) - np.log(b)) for a, b in zip(p[-1], row) if a > 0) for row in p])
    rank = np.array([int((row > row[target]).sum()) for row in logits])
    return p, entropy, kl, rank


def test_lens_metrics_against_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen, dtype=torch.float64) * 3
    m = lens.lens_metrics(logits, target_id=7, top_k=3)
    p, entropy, kl, rank = _numpy_metrics(logits.numpy(), 7)
    assert np.allclose(m["target_prob"].numpy(), p[:, 7], atol=1e-6)
    assert np.allclose(m["entropy"].numpy(), entropy, atol=1e-5)
    assert np.allclose(m["kl_to_final"].numpy(), kl, atol=1e-5)
    assert np.allclose(lens.kl_divergence(logits[-1], logits).numpy(), kl, atol=1e-5)  # the KL check's own way
    assert (m["target_rank"].numpy() == rank).all()
    top = np.sort(p, axis=1)[:, ::-1][:, :3]
    assert np.allclose(m["probs_top"].numpy(), top, atol=1e-6)
    assert (m["ids_top"][:, 0].numpy() == p.argmax(axis=1)).all()


def test_temperature_rescales_but_keeps_ranks():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    cold, hot = lens.lens_metrics(logits, 3, temperature=0.5), lens.lens_metrics(logits, 3, temperature=2.0)
    assert torch.equal(cold["target_rank"], hot["target_rank"])
    assert (cold["entropy"] < hot["entropy"]).all()


@pytest.mark.parametrize("n, expected", [(30, [0, 5, 10, 15, 20, 25, 30]), (32, [0, 5, 10, 16, 21, 26, 32]),
                                         (4, [0, 1, 2, 3, 4]), (42, [0, 7, 14, 21, 28, 35, 42])])
def test_key_layers(n, expected):
    assert lens.key_layers(n) == expected


def test_resolution_depth_on_hand_made_curves():
    # top-1 at layer 2, lost at 3, top-1 again from 4 to the end (n = 6)
    ranks = [9, 5, 0, 1, 0, 0, 0]
    probs = [0.0, 0.1, 0.4, 0.3, 0.45, 0.7, 0.9]
    entropy = [5.0, 4.8, 3.0, 3.2, 2.9, 1.0, 0.6]
    result = lens.resolution_depth(ranks, probs, entropy)
    assert result["first_top1_layer"] == 4 and result["first_top1_depth"] == pytest.approx(4 / 6)
    assert result["first_p50_layer"] == 5
    assert result["entropy_drop_layer"] == 5 and result["entropy_drop_nats"] == pytest.approx(1.9)


def test_resolution_depth_when_never_resolved():
    result = lens.resolution_depth([3, 2, 1], [0.1, 0.2, 0.3], [2.0, 1.0, 1.5])
    assert result["first_top1_layer"] is None and result["first_top1_depth"] is None
    assert result["first_p50_layer"] is None
    assert result["entropy_drop_layer"] == 1
    only_last = lens.resolution_depth([3, 2, 0], [0.1, 0.2, 0.6], [2.0, 1.0, 0.5])
    assert only_last["first_top1_layer"] == 2 and only_last["first_top1_depth"] == 1.0


def _random_lens_logits():
    return torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * 3  # [layers, vocab]


def test_kl_check_passes_on_the_lens_metrics_and_fails_on_a_wrong_kl():
    logits = _random_lens_logits()
    reported = lens.lens_metrics(logits, target_id=4)["kl_to_final"]
    assert lens.check_kl_to_final("lens", logits, logits[-1], reported, torch.float32)["passed"]
    assert lens.check_kl_to_final("lens", logits, None, reported, torch.float32)["passed"]  # its own last layer
    wrong_reference = lens.lens_metrics(torch.cat([logits[:-1], logits[:1]]), target_id=4)["kl_to_final"]
    failed = lens.check_kl_to_final("lens", logits, logits[-1], wrong_reference, torch.float32)
    assert not failed["passed"] and failed["max_abs_diff"] > 0.1
    other_final = logits[-1] + torch.linspace(0, 1, 40)  # a model output the lens's last layer does not match
    assert not lens.check_kl_to_final("lens", logits, other_final, reported, torch.float32)["passed"]


def test_rank_check_counts_the_ranks_another_way():
    logits = _random_lens_logits()
    ranks = {t: lens.lens_metrics(logits, 7, temperature=t)["target_rank"] for t in (0.5, 1.0, 3.0)}
    check = lens.check_ranks_under_temperature("lens", logits, 7, ranks)
    assert check["passed"] and "T = 0.5, 1, 3" in check["name"]
    ranks[3.0] = ranks[3.0] + torch.tensor([0, 0, 2, 0, 0])
    failed = lens.check_ranks_under_temperature("lens", logits, 7, ranks)
    assert not failed["passed"] and failed["max_abs_diff"] == 2


def test_rank_check_allows_float32_division_ties():
    """Two logits one ulp apart can round to one value once divided by T (3.3 and the next float32, at T = 1.5):
    the rank then changes by one, honestly. The check counts in the divided row, so it still passes."""
    target = torch.tensor(3.3)
    row = torch.tensor([0.0, float(torch.nextafter(target, torch.tensor(9.0))), float(target), -1.0])  # [vocab]
    logits = row.repeat(2, 1)  # [layers, vocab]
    ranks = {t: lens.lens_metrics(logits, 2, top_k=2, temperature=t)["target_rank"] for t in (1.0, 1.5)}
    assert ranks[1.0].tolist() == [1, 1] and ranks[1.5].tolist() == [0, 0]  # the tie that float32 makes
    assert lens.check_ranks_under_temperature("lens", logits, 2, ranks)["passed"]


def test_trajectory_records_and_resolution(tiny):
    ids = encode(tiny, "The capital of France is")
    by_temperature = lens.sweep(tiny, ids, target_id=5, top_k=2, temperatures=(2.0, 0.5))
    assert list(by_temperature) == [0.5, 1.0, 2.0]  # 1.0 always, in increasing order
    trajectory = by_temperature[1.0]
    assert trajectory.n_layers == tiny.n_layers and len(trajectory.checks) == 3 and trajectory.check["passed"]
    records = trajectory.layer_records()
    assert [r["layer"] for r in records] == list(range(tiny.n_layers + 1)) and records[-1]["depth"] == 1.0
    assert all(len(r["top_tokens"]) == 2 and isinstance(r["top_tokens"][0], list) for r in records)
    expected = lens.resolution_depth(trajectory.target_rank, trajectory.target_prob, trajectory.entropy)
    assert trajectory.resolution().as_record() == expected
    assert trajectory.final_rank == records[-1]["target_rank"] and trajectory.top_k_mass[0] <= 1 + 1e-6
