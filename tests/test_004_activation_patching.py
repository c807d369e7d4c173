"""004 activation patching: its identities on tiny models of four architectures, batching against an
independent one-at-a-time reference, attribution against finite differences, causal tracing, the pure
helpers, the experiment end to end (embedded model and a tiny Gemma-2) with its bad inputs, and a fault
injected under each of the run's self-checks, which its report must show as FAIL."""
import json

import pytest
import torch

from common import hooks, interventions, patching
from common.errors import LabError
from common.interventions import cache_run, run_rows
from common.lens import first_layer_staying_true
from common.patching import (EncodedPair, answer_readout, attribution_for_cells, attribution_products, causal_trace,
                             differing_positions, embedding_std, encode_pair, gaussian_noise, grid_layout,
                             grid_record, head_cells, load_pairs, normalize, pair_baseline, patch_rows, pearson,
                             position_cells, strongest_cells, trace_window, window_blocks, window_cells)
from common.prompts import Target, encode
from conftest import ARCHITECTURES, assert_fails_cleanly, run_folders, run_in_process, run_script

SCRIPT = "004_activation_patching/run.py"
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"
GRIDS = ("resid", "attn", "mlp", "head_all", "head_final")


# ----------------------------------------------------------------------------- pure helpers


def test_site_hook_names_follow_the_lens_layer_convention():
    assert hooks.site_names("resid", 3) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post",
                                             "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert hooks.site_names("attn", 2) == ["blocks.0.hook_attn_out", "blocks.1.hook_attn_out"]
    assert hooks.site_names("mlp", 1) == ["blocks.0.hook_mlp_out"]
    assert hooks.site_names("head", 2) == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def test_cells_are_row_major():
    cells = position_cells(["a", "b"], 3)
    assert cells[4] == [("b", (1,))] and len(cells) == 6
    heads = head_cells(["a", "b"], 2)
    assert heads[3] == [("b", (slice(None), 1))]
    assert head_cells(["a"], 2, position=4)[1] == [("a", (4, 1))]
    layout = grid_layout("head_final", 3, 2, seq=5)
    assert layout.shape == (3, 2) and layout.cells[5] == [(hooks.block_site("head", 2), (4, 1))]
    assert grid_layout("resid", 3, 2, seq=5).shape == (4, 5)


@pytest.mark.parametrize("n_layers, window", [(48, 10), (30, 6), (32, 7), (42, 9), (4, 1), (1, 1)])
def test_trace_window_scales_with_depth(n_layers, window):
    assert trace_window(n_layers) == window


def test_windows_are_centred_and_clipped():
    assert list(window_blocks(5, 4, 10)) == [3, 4, 5, 6]
    assert list(window_blocks(0, 4, 10)) == [0, 1]
    assert list(window_blocks(9, 4, 10)) == [7, 8, 9]
    cells = window_cells(["m0", "m1", "m2"], 2, 3)
    assert cells[2] == [("m0", (0,)), ("m1", (0,)), ("m2", (0,))]  # block 1, position 0


@pytest.mark.parametrize("flags, expected", [([False, True, True], 1), ([True, False, True], 2),
                                             ([True, True], 0), ([True, False], None), ([], None)])
def test_first_layer_staying_true(flags, expected):
    assert first_layer_staying_true(flags) == expected


def test_normalize_and_pearson():
    values = torch.tensor([-2.0, 1.0, 4.0])
    assert torch.allclose(normalize(values, clean=4.0, corrupt=-2.0), torch.tensor([0.0, 0.5, 1.0]))
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.5])) == pytest.approx(0.9986, abs=1e-3)
    assert pearson(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])) is None


def test_noise_is_seeded():
    a, b = gaussian_noise(2, 3, 4, 0.5, seed=1), gaussian_noise(2, 3, 4, 0.5, seed=1)
    assert torch.equal(a, b) and a.shape == (2, 3, 4)
    assert not torch.equal(a, gaussian_noise(2, 3, 4, 0.5, seed=2))


@pytest.mark.parametrize("content, fragment", [
    ("[{", "not valid JSON"), ("[]", "non-empty JSON list"),
    (json.dumps([{"clean": "a", "corrupt": "b", "clean_answer": "x"}]), "entry 0 must be an object"),
    (json.dumps([{"clean": "a", "corrupt": " ", "clean_answer": "x", "corrupt_answer": "y"}]), "non-empty text"),
])
def test_bad_pairs_files(tmp_path, content, fragment):
    path = tmp_path / "pairs.json"
    path.write_text(content)
    with pytest.raises(LabError, match=fragment):
        load_pairs(path)


# ----------------------------------------------------------------------------- tiny models


def _answers(model, clean_ids, corrupt_ids):
    """Two answer tokens for a random model: its top-1 after the clean and after the corrupt prompt."""
    clean_logits, corrupt_logits = cache_run(model, clean_ids, []).logits, cache_run(model, corrupt_ids, []).logits
    first = int(clean_logits.argmax())
    second = int(corrupt_logits.argmax())
    if second == first:
        second = int(clean_logits.topk(2).indices[1])
    return first, second


class Setup:
    """A pair on one model: its baseline (the clean and corrupt runs with every site) and every grid's cells."""

    def __init__(self, model):
        self.model = model
        self.clean_ids, self.corrupt_ids = encode(model, CLEAN), encode(model, CORRUPT)
        self.seq, n = self.clean_ids.shape[1], model.n_layers
        answers = [Target(i, "", 1) for i in _answers(model, self.clean_ids, self.corrupt_ids)]
        self.layouts = {g: grid_layout(g, n, model.n_heads, self.seq) for g in GRIDS}
        self.names = sorted({name for layout in self.layouts.values() for name in layout.hook_names})
        self.baseline = pair_baseline(model, EncodedPair(self.clean_ids, self.corrupt_ids, *answers), self.names, "t")
        self.readout = self.baseline.readout
        self.clean_acts, self.corrupt_acts = self.baseline.clean.acts, self.baseline.corrupt.acts
        self.ld_clean, self.ld_corrupt = self.baseline.logit_diff_clean, self.baseline.logit_diff_corrupt
        self.all_cells = [cell for layout in self.layouts.values() for cell in layout.cells]

    def patch(self, which, cells, source, batch_size=32, skip_unchanged=False):
        """Patch `cells` from `source` into the clean or corrupt run (with the shared prefix)."""
        return run_rows(self.model, self.baseline.base(which), patch_rows(cells, source), self.readout, batch_size,
                        skip_unchanged=skip_unchanged)


_setups = {}


@pytest.fixture
def setup(tiny):
    key = id(tiny)
    if key not in _setups:
        _setups[key] = Setup(tiny)
    return _setups[key]


def test_identities(setup):
    """Clean into clean gives the clean run everywhere, corrupt into corrupt the corrupt run, and the whole
    residual stream (at the last layer or at the embeddings) turns the corrupt run into the clean one."""
    s = setup
    assert abs(s.ld_clean - s.ld_corrupt) > 1e-3  # the pair is one the tiny model tells apart
    clean = s.patch("clean", s.all_cells, s.clean_acts)["logit_diff"]
    corrupt = s.patch("corrupt", s.all_cells, s.corrupt_acts)["logit_diff"]
    assert (clean - s.ld_clean).abs().max() < 1e-4
    assert (corrupt - s.ld_corrupt).abs().max() < 1e-4
    resid = hooks.site_names("resid", s.model.n_layers)
    whole = [[(resid[-1], (slice(None),))], [(resid[0], (slice(None),))]]
    out = s.patch("corrupt", whole, s.clean_acts)["logit_diff"]
    assert (out - s.ld_clean).abs().max() < 1e-4
    normalized = normalize(out, s.ld_clean, s.ld_corrupt)
    assert torch.allclose(normalized, torch.ones(2), atol=1e-3)


def _patch_one_reference(model, ids, cell, source, readout):
    """Independent reference: one forward of batch 1, the whole prompt, a plain overwrite hook per patch."""
    def make(name, index):
        def hook(act, hook):
            act = act.clone()
            act[(0,) + index] = source[name][index]
            return act
        return hook
    with torch.no_grad():
        logits = model.bridge.run_with_hooks(ids, fwd_hooks=[(name, make(name, index)) for name, index in cell])
    return readout(logits[:, -1])["logit_diff"][0]


def test_batched_equals_one_at_a_time(setup):
    s = setup
    batched = s.patch("corrupt", s.all_cells, s.clean_acts, batch_size=13)["logit_diff"]  # 13: ragged chunks
    picks = list(range(0, len(s.all_cells), 9)) + [len(s.all_cells) - 1]  # every grid, first and last chunk
    alone = torch.stack([_patch_one_reference(s.model, s.corrupt_ids, s.all_cells[i], s.clean_acts, s.readout)
                         for i in picks])
    assert (batched[picks] - alone).abs().max() < 1e-5
    assert (alone - s.ld_corrupt).abs().max() > 1e-3  # the patches do change the answer


def test_skipped_cells_are_exactly_the_unchanged_ones(setup):
    """Positions before the first differing token are the same in both runs: not run, and the same value."""
    s = setup
    cells = s.layouts["resid"].cells + s.layouts["mlp"].cells + s.layouts["head_final"].cells
    full = s.patch("corrupt", cells, s.clean_acts)
    skipping = s.patch("corrupt", cells, s.clean_acts, skip_unchanged=True)
    assert full["ran"].all() and not skipping["ran"].all()
    first_diff = differing_positions(s.clean_ids, s.corrupt_ids)[0]
    for cell, ran in zip(cells, skipping["ran"].tolist()):
        (name, index), = cell
        assert ran != torch.equal(s.clean_acts[name][index], s.corrupt_acts[name][index]), cell
        if index[0] < first_diff:
            assert not ran, cell  # before the first difference: the same in both runs (causal model)
    assert (full["logit_diff"] - skipping["logit_diff"]).abs().max() < 1e-5


@pytest.fixture(params=ARCHITECTURES)
def tiny64(request, tiny_folders):
    """The tiny models in float64, so finite differences are precise."""
    from common.models import load_model
    return load_model(str(tiny_folders[request.param]), "cpu", "float64")


def test_attribution_matches_finite_differences(tiny64):
    """Attribution patching is the derivative of the metric along (clean - corrupt) at the corrupt run."""
    s = Setup(tiny64)
    clean_id, corrupt_id = _answers(tiny64, s.clean_ids, s.corrupt_ids)
    products, ld = attribution_products(tiny64, s.corrupt_ids, s.names, s.clean_acts,
                                        lambda logits: logits[clean_id] - logits[corrupt_id])
    assert ld == pytest.approx(s.ld_corrupt, abs=1e-9)
    cells = [cell for layout in s.layouts.values() for cell in layout.cells[-6:]]  # the last rows of every grid
    estimate = attribution_for_cells(products, cells)
    eps = 3e-3  # HF's eager attention takes its softmax in float32, so a smaller step only adds rounding
    shifted = {sign: {name: s.corrupt_acts[name] + sign * eps * (s.clean_acts[name] - s.corrupt_acts[name])
                      for name in s.names} for sign in (1, -1)}
    plus = s.patch("corrupt", cells, shifted[1])["logit_diff"].double()
    minus = s.patch("corrupt", cells, shifted[-1])["logit_diff"].double()
    finite = (plus - minus) / (2 * eps)
    assert estimate.abs().max() > 1e-3  # some cells matter, so the comparison means something
    worst = float((estimate - finite).abs().max() / finite.abs().max())
    assert worst < 1e-3, worst


def test_causal_trace(setup):
    s = setup
    subject = differing_positions(s.clean_ids, s.corrupt_ids)
    n = s.model.n_layers
    cells = position_cells(hooks.site_names("resid", n), s.seq) + \
        window_cells(hooks.site_names("mlp", n), s.seq, 2)
    restore_all = [[(hooks.resid(0), (slice(None),))]]
    p_clean = cache_run(s.model, s.clean_ids, []).read(s.readout)["p_clean"]
    same = dict(rel=1e-4)  # p(answer) of a random model is ~1/vocab, so compare relatively
    silent = causal_trace(s.model, s.clean_ids, s.clean_acts, cells, s.readout,
                            torch.zeros(1, len(subject), s.model.d_model), subject, batch_size=16)
    assert silent["p_noised"] == pytest.approx(p_clean, **same)  # zero noise changes nothing
    assert silent["restored"].tolist() == pytest.approx([p_clean] * len(cells), **same)
    scale = 3 * embedding_std(s.model, [s.clean_ids, s.corrupt_ids])  # ROME's level
    noise = gaussian_noise(2, len(subject), s.model.d_model, scale, seed=0)
    traced = causal_trace(s.model, s.clean_ids, s.clean_acts, cells + restore_all, s.readout, noise, subject, 16)
    assert traced["p_noised"] != pytest.approx(p_clean, rel=1e-3)  # the noise moves the answer
    assert float(traced["restored"][-1]) == pytest.approx(p_clean, **same)  # restoring everything undoes it
    # Restoring the subject's own embedding (layer 0) undoes all the noise, since it is the only noised state.
    assert len(subject) == 1 and float(traced["restored"][subject[0]]) == pytest.approx(p_clean, **same)
    again = causal_trace(s.model, s.clean_ids, s.clean_acts, cells + restore_all, s.readout, noise, subject, 5)
    assert again["restored"].tolist() == pytest.approx(traced["restored"].tolist(), **same)  # other batching


def test_pairs_that_cannot_be_patched_are_refused(tiny):
    with pytest.raises(LabError, match=r"same number of tokens.*'The', ' capital'"):
        encode_pair(tiny, {"clean": CLEAN, "corrupt": "The capital city of Italy is", "clean_answer": "Paris",
                             "corrupt_answer": "Rome"}, "Pair 0")
    with pytest.raises(LabError, match="both answers start with"):
        encode_pair(tiny, {"clean": CLEAN, "corrupt": CORRUPT, "clean_answer": "Paris",
                             "corrupt_answer": "Paris"}, "Pair 0")
    with pytest.raises(LabError, match="same tokens"):
        encode_pair(tiny, {"clean": CLEAN, "corrupt": CLEAN, "clean_answer": "Paris",
                             "corrupt_answer": "Rome"}, "Pair 0")


def test_built_in_pairs_can_be_patched_on_the_embedded_model(embedded):
    from pathlib import Path
    pairs = load_pairs(Path(__file__).resolve().parent.parent / "004_activation_patching" / "pairs.json")
    for i, pair in enumerate(pairs):
        enc = encode_pair(embedded, pair, f"Pair {i}")  # equal token counts, different answer tokens
        assert differing_positions(enc.clean_ids, enc.corrupt_ids)


# ----------------------------------------------------------------------------- end to end


def _check_contract(results: dict, sites: list[str], n_layers: int, n_heads: int):
    assert results["experiment"] == "004_activation_patching"
    assert results["sites"] == sites and results["n_layers"] == n_layers and results["n_heads"] == n_heads
    for record in results["pairs"]:
        seq = len(record["clean_tokens"])
        assert len(record["corrupt_tokens"]) == seq
        for method in ("exact", "attribution"):
            assert set(record[method]) == set(results["grids"])
            for grid, matrix in record[method].items():
                rows = n_layers + 1 if grid == "resid" else n_layers
                cols = n_heads if grid.startswith("head") else seq
                assert len(matrix) == rows and all(len(row) == cols for row in matrix), grid
        assert all(check["passed"] for check in record["self_checks"]), record["self_checks"]
        link = record["link_to_001"]
        assert len(link["final_position_clean_is_top1"]) == len(link["lens_target_rank"]) == n_layers + 1


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs004")
    pairs = out / "pairs.json"
    pairs.write_text(json.dumps([{"clean": CLEAN, "corrupt": CORRUPT, "clean_answer": "Paris",
                                  "corrupt_answer": "Rome"}]))
    # The other sites and causal tracing run end to end on the tiny Gemma-2 below (and tracing on this model
    # in-process), which keeps this file fast.
    result = run_script(SCRIPT, f"--OUT_DIR={out}", f"--PAIRS_FILE={pairs}", "--SITES=resid",
                        "--NOISE_TRACING=False", "--BATCH_SIZE=64")
    return out, result


def test_embedded_run_writes_the_contract_files(embedded_run):
    out, result = embedded_run
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(out)
    names = {p.name for p in folder.iterdir()}
    assert {"results.json", "config.json", "report.md", "pair0_resid_exact.png", "pair0_resid_attribution.png",
            "pair0_exact_vs_attribution.png"} <= names
    results = json.loads((folder / "results.json").read_text())
    _check_contract(results, ["resid"], 30, 9)
    report = (folder / "report.md").read_text()
    assert "PASS: batched == one plain forward per cell" in report and "FAIL" not in report
    assert "001 resolution layer" in report and "![resid exact](pair0_resid_exact.png)" in report


def test_embedded_run_science(embedded_run):
    """France -> Italy differs in one token (position 3): patching that embedding alone restores the clean
    run; earlier positions are untouched; the final position switches the answer somewhere in the network."""
    out, _ = embedded_run
    [folder] = run_folders(out)
    [record] = json.loads((folder / "results.json").read_text())["pairs"]
    assert record["differing_positions"] == [3]
    resid = record["exact"]["resid"]
    assert resid[0][3] == pytest.approx(1.0, abs=1e-4)
    assert resid[-1][-1] == pytest.approx(1.0, abs=1e-4)
    assert max(abs(row[p]) for row in resid for p in range(3)) < 1e-5  # the same in both runs: the corrupt run
    link = record["link_to_001"]
    assert link["switch_layer"] is not None and 0 < link["switch_layer"] <= 30
    assert link["resolution_layer"] is not None


def test_causal_trace_on_the_embedded_model(embedded):
    """ROME's noise on " France" destroys the answer " Paris"; restoring that clean embedding brings it back."""
    clean_ids, corrupt_ids = encode(embedded, CLEAN), encode(embedded, CORRUPT)
    subject = differing_positions(clean_ids, corrupt_ids)
    names = hooks.site_names("resid", embedded.n_layers)
    clean = cache_run(embedded, clean_ids, names)
    clean_logits, clean_acts, clean_id = clean.logits, clean.acts, int(clean.logits.argmax())
    readout = answer_readout(clean_id, int(cache_run(embedded, corrupt_ids, []).logits.argmax()))
    p_clean = float(torch.softmax(clean_logits.float(), -1)[clean_id])
    scale = 3 * embedding_std(embedded, [clean_ids, corrupt_ids])
    cells = position_cells(names, clean_ids.shape[1])
    trace = causal_trace(embedded, clean_ids, clean_acts, cells, readout,
                           gaussian_noise(1, len(subject), embedded.d_model, scale, seed=0), subject, 64)
    assert embedded.tokenizer.decode([clean_id]) == " Paris" and subject == [3]
    assert trace["p_noised"] < 0.5 * p_clean
    assert float(trace["restored"][3]) == pytest.approx(p_clean, abs=1e-4)  # layer 0, position 3
    assert float(trace["restored"][-1]) == pytest.approx(p_clean, abs=1e-4)  # the last layer's final position


def test_tiny_gemma2_run_with_every_site(tmp_path, tiny_folders):
    """Every site and method end to end on the soft-capped architecture."""
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--MODEL={tiny_folders['gemma2']}", f"--OUT_DIR={out}", "--NOISE_SAMPLES=2",
                        f"--PAIRS_FILE={_pairs_file(tmp_path)}")
    assert result.returncode == 0, result.stderr
    [folder] = run_folders(out)
    results = json.loads((folder / "results.json").read_text())
    _check_contract(results, ["resid", "attn", "mlp", "head"], 4, 4)
    assert {f"pair0_{g}_{m}.png" for g in GRIDS for m in ("exact", "attribution")} <= {p.name for p in folder.iterdir()}


def _pairs_file(tmp_path, **changes):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"clean": CLEAN, "corrupt": CORRUPT, "clean_answer": "Paris",
                                 "corrupt_answer": "Rome"} | changes]))
    return path


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: [f"--PAIRS_FILE={_pairs_file(tmp, corrupt='The capital city of Italy is')}"],
     "same number of tokens, but clean has 5 ['The', ' capital', ' of', ' France', ' is'] and corrupt has 6"),
    (lambda tmp: ["--SITES=['resid', 'neurons']"], "SITES must list some of"),
    (lambda tmp: ["--METHOD=guess"], "METHOD must be one of"),
    (lambda tmp: [f"--PAIRS_FILE={_pairs_file(tmp, clean_answer='')}"], "non-empty text fields"),
])
def test_bad_input_fails_with_one_line_and_no_results(tmp_path, make_args, fragment):
    out = tmp_path / "out"
    result = run_script(SCRIPT, f"--OUT_DIR={out}", *make_args(tmp_path))
    assert_fails_cleanly(result, out, fragment)


# ----------------------------------------------------------------------------- EXACT="top": screen, then confirm


def test_strongest_cells_are_the_largest_changed_estimates():
    estimate = torch.tensor([0.1, -0.9, 0.5, 0.8, -0.2])
    changed = torch.tensor([True, True, True, False, True])  # 0.8 writes nothing new: exactly 0, never chosen
    assert strongest_cells(estimate, changed, 2) == [1, 2]
    assert strongest_cells(estimate, changed, 10) == [0, 1, 2, 4]
    assert grid_record(torch.tensor([[float("nan"), 7.0], [8.0, float("nan")]])) == [[None, 7.0], [8.0, None]]


def _grid_values(grid: list[list]) -> torch.Tensor:
    """A results.json grid as float64 [rows, cols], nan for the cells that were not run."""
    return torch.tensor([[float("nan") if v is None else v for v in row] for row in grid], dtype=torch.float64)


def test_exact_top_confirms_the_screened_cells_with_the_exhaustive_values(tiny_folders, tmp_path):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"clean": CLEAN, "corrupt": CORRUPT, "clean_answer": "Paris",
                                  "corrupt_answer": "Rome"}]))
    runs = {}
    for exact in ("top", "all"):
        out = tmp_path / exact
        result = run_script(SCRIPT, f"--MODEL={tiny_folders['llama']}", f"--OUT_DIR={out}", f"--PAIRS_FILE={pairs}",
                            "--SITES=['resid', 'attn', 'head']", "--NOISE_TRACING=False", f"--EXACT={exact}",
                            "--EXACT_TOP_K=3")
        assert result.returncode == 0, result.stderr[-2000:]
        [folder] = run_folders(out)
        runs[exact] = json.loads((folder / "results.json").read_text())["pairs"][0]
    top, full = runs["top"], runs["all"]
    assert top["exact_cells"]["resid"]["run"] == top["exact_cells"]["resid"]["of"]  # the resid grid stays exact
    for grid in ("attn", "head_all", "head_final"):
        assert top["exact_cells"][grid]["run"] == 3 < top["exact_cells"][grid]["of"]
        screened, exhaustive = _grid_values(top["exact"][grid]), _grid_values(full["exact"][grid])
        run = ~screened.isnan()
        assert int(run.sum()) == 3 and not exhaustive.isnan().any()
        assert torch.allclose(screened[run], exhaustive[run], atol=1e-6)
        # the 3 confirmed cells are the 3 largest |attribution| estimates among the changed cells
        estimate = _grid_values(top["attribution"][grid]).flatten().abs()
        assert estimate[run.flatten()].min() >= estimate[~run.flatten() & (exhaustive.flatten() != 0)].max()
    assert all(check["passed"] for check in top["self_checks"])


# ----------------------------------------------------------------------------- faults the self-checks must catch
# Each fault is a bug injected into the run's code path; the run must still finish, and its report must show
# the self-check that guards against that bug as FAIL (with 004's tolerances set to 1e9, these tests fail).


def _attribution_off_by_one(monkeypatch):
    """The gradient's forward reports a logit difference off by 1."""
    real = patching.attribution_products
    monkeypatch.setattr(patching, "attribution_products", lambda *args: (lambda products, value: (
        products, value + 1.0))(*real(*args)))


def _writes_perturbed(monkeypatch):
    """The engine writes every patch 0.5 off its source value."""
    real = interventions.edit_hooks
    monkeypatch.setattr(interventions, "edit_hooks", lambda rows, every_row=(): real(
        [[(name, index, value + 0.5) for name, index, value in row] for row in rows], every_row))


def _writes_into_every_row(monkeypatch):
    """The engine writes each row's patches into every row of the batch."""
    real = interventions.edit_hooks
    monkeypatch.setattr(interventions, "edit_hooks", lambda rows, every_row=(): real(
        rows, list(every_row) + [edit for row in rows for edit in row]))


def _drops_all_position_patches(monkeypatch):
    """The shared-prefix shift loses the patches of every position (slice(None))."""
    real = interventions._after_prefix
    monkeypatch.setattr(interventions, "_after_prefix", lambda edit, base, seq: None if isinstance(
        edit[1][0], slice) else real(edit, base, seq))


def _shifts_positions_by_one(monkeypatch):
    """The shared-prefix shift writes single positions one position too early."""
    real = interventions._after_prefix

    def shifted(edit, base, seq):
        out = real(edit, base, seq)
        if out is None or isinstance(out[1][0], slice) or out[1][0] == 0:
            return out
        name, (position, *rest), value = out
        return name, (position - 1, *rest), value
    monkeypatch.setattr(interventions, "_after_prefix", shifted)


def _noise_after_restoring(monkeypatch):
    """Causal tracing's noise is written after the clean states it should give way to."""
    real = interventions.edit_hooks
    monkeypatch.setattr(interventions, "edit_hooks", lambda rows, every_row=(): real(
        [list(row) + list(every_row) for row in rows]))


@pytest.mark.parametrize("fault, failing", [
    (None, []),
    (_attribution_off_by_one, ["attribution's corrupt forward"]),
    (_writes_perturbed, ["batched == one plain forward per cell", "clean into clean"]),
    (_writes_into_every_row, ["corrupt run in a batch, nothing patched"]),
    (_drops_all_position_patches, ["whole residual at the last layer", "whole residual at layer 0"]),
    (_shifts_positions_by_one, ["clean into clean", "corrupt into corrupt"]),
    (_noise_after_restoring, ["causal trace: restoring every clean embedding"]),
])
def test_an_injected_fault_shows_as_a_failed_self_check(tiny_folders, tmp_path, monkeypatch, fault, failing):
    if fault is not None:
        fault(monkeypatch)
    tracing = fault in (None, _noise_after_restoring)
    folder = run_in_process(SCRIPT, f"--MODEL={tiny_folders['llama']}", f"--OUT_DIR={tmp_path}",
                            f"--PAIRS_FILE={_pairs_file(tmp_path)}", "--SITES=resid", f"--NOISE_TRACING={tracing}",
                            "--NOISE_SAMPLES=1")
    checks = json.loads((folder / "results.json").read_text())["pairs"][0]["self_checks"]
    report = (folder / "report.md").read_text()
    for fragment in failing:
        [record] = [c for c in checks if c["name"].startswith(fragment)]
        assert not record["passed"] and f"**FAIL**: {record['name']}" in report, record
    if fault is None:
        assert all(c["passed"] for c in checks) and "FAIL" not in report and len(checks) == 8


# ----------------------------------------------------------------------------- pairs from the fact set, statistics across pairs


def test_handoff_and_head_frequency():
    from common.patching import handoff, head_frequency
    assert handoff([1.0, 0.9, 0.2, 0.6, 0.0], [0.0, 0.1, 0.7, 0.4, 0.9]) == (3, 4)
    assert handoff([0.1, 0.2], [0.6, 0.7]) == (None, 0)
    frequency = head_frequency([["L1H0", "L2H1"], None, ["L1H0"], ["L3H0"]], seed=0)
    assert [h["head"] for h in frequency][0] == "L1H0"
    assert frequency[0]["share"]["value"] == pytest.approx(2 / 3) and frequency[0]["share"]["n"] == 3


def _few_facts(tmp_path) -> str:
    """Four capital facts of 001's set: enough for a few pairs on the tiny models (SmolLM2's tokenizer)."""
    from pathlib import Path
    facts = json.loads((Path(__file__).resolve().parent.parent / "001_layers_and_logits" / "prompts.json").read_text())
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([f for f in facts if f["relation"] == "capital"][:4]))
    return str(path)


def test_default_pairs_come_from_001s_fact_set(embedded):
    """With the default toggles the run studies N_PAIRS = 20 pairs that can all be patched."""
    from pathlib import Path
    from common.facts import counterfactual_pairs, load_fact_set
    facts = load_fact_set(Path(__file__).resolve().parent.parent / "001_layers_and_logits" / "prompts.json")
    pairs = counterfactual_pairs(embedded.tokenizer, facts, 20, seed=0)
    assert len(pairs) == 20 and len({p["relation"] for p in pairs}) >= 8
    for i, pair in enumerate(pairs):
        encode_pair(embedded, pair, f"Pair {i}")


def test_facts_run_reports_statistics_across_pairs(tiny_folders, tmp_path, monkeypatch):
    """Pairs built from a fact file; every statistic over pairs is {"value", "ci95", "n"} and agrees with a
    recomputation from the per-pair records over the pairs that can switch; only the first DETAIL_PAIRS pairs
    are traced. A random model answers no fact, so which pairs 'can switch' is set here: all but France's."""
    import numpy as np
    from common.patching import PairStudy
    monkeypatch.setattr(PairStudy, "can_switch", property(lambda study: "france" not in study.pair["id"]))
    folder = run_in_process(SCRIPT, f"--MODEL={tiny_folders['llama']}", f"--OUT_DIR={tmp_path}", "--N_PAIRS=3",
                            f"--FACTS_FILE={_few_facts(tmp_path)}", "--SITES=['resid', 'head']", "--DETAIL_PAIRS=1",
                            "--NOISE_SAMPLES=1", "--EXACT=all")
    results = json.loads((folder / "results.json").read_text())
    pairs, across = results["pairs"], results["across_pairs"]
    assert len(pairs) == 3 and all(p["id"].endswith("_capital") and "_vs_" in p["id"] for p in pairs)
    assert ["causal_trace" in p for p in pairs] == [True, False, False]
    n = results["n_layers"]
    switchable = [p for p in pairs if "france" not in p["id"]]
    assert 0 < len(switchable) < 3, [p["id"] for p in pairs]  # the filter has something to leave out
    depths = [p["link_to_001"]["switch_layer"] / n for p in switchable if p["link_to_001"]["switch_layer"] is not None]
    assert across["switchable"]["n"] == 3 and across["switchable"]["value"] == pytest.approx(len(switchable) / 3)
    assert across["switch_share"]["n"] == len(switchable) and across["switch_depth"]["n"] == len(depths)
    assert across["switch_depth"]["value"] == (pytest.approx(float(np.median(depths))) if depths else None)
    last = [[row[-1] for row in p["exact"]["resid"]] for p in switchable]
    assert across["restoration"]["last"]["n"] == len(switchable)
    assert across["restoration"]["last"]["value"] == pytest.approx(np.mean(last, axis=0).tolist())
    for p in switchable:  # every pair's top heads by |exact| at the final position, as the frequency counts them
        values = np.abs(np.asarray(p["exact"]["head_final"], float)).flatten()
        p["top"] = {f"L{i // results['n_heads']}H{i % results['n_heads']}" for i in np.argsort(-values, kind="stable")[:5]}
    for head in across["heads"]:
        share = sum(head["head"] in p["top"] for p in switchable) / len(switchable)
        assert head["share"]["value"] == pytest.approx(share) and head["share"]["n"] == len(switchable)
    for record in [across[k] for k in ("switchable", "switch_share", "resolution_depth", "lens_lag")]:
        assert set(record) >= {"value", "ci95", "n"} and len(record["ci95"]) == 2
    report = (folder / "report.md").read_text()
    assert "## Across pairs" in report and "![switch depth across pairs](switch_depth_across_pairs.png)" in report
    assert "## Pair 0" in report and "## Pair 1" not in report and not (folder / "pair1_resid_exact.png").exists()
    assert "capital" in report and (folder / "restoration_by_layer.png").exists()


@pytest.mark.parametrize("args, fragment", [(["--N_PAIRS=0"], "N_PAIRS must be at least 1"),
                                            (["--DETAIL_PAIRS=-1"], "DETAIL_PAIRS must be 0 or more"),
                                            (["--FACTS_FILE=/nonexistent/facts.json"], "nonexistent")])
def test_bad_pair_toggles_fail_with_one_line(tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_fails_cleanly(run_script(SCRIPT, f"--OUT_DIR={out}", *args), out, fragment)
