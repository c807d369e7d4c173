"""common/attention_results.py: 003's reader of 002's results, against a real 002 run and broken ones."""
import importlib.util
import json

import pytest
import torch

from common.attention_results import read_head_ranking
from conftest import REPO

GOOD = {"layers": [1, 2], "depth_range": [0.4, 0.85], "prompts": [{}, {}, {}],
        "head_ranking": [{"layer": 2, "head": 1, "mean": 0.5, "top_rate": 1.0, "std": 0.1},
                         {"layer": 1, "head": 0, "mean": 0.25, "top_rate": 0.5}]}


def _write_run(root, slug: str, stamp: str, data) -> None:
    folder = root / slug / stamp
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_reads_the_newest_run_with_the_stated_schema(tmp_path):
    _write_run(tmp_path, "m", "2026-01-01_000000", dict(GOOD, layers=[9]))
    _write_run(tmp_path, "m", "2026-02-01_000000", GOOD)
    _write_run(tmp_path, "other-model", "2026-03-01_000000", GOOD)
    ranking, notes = read_head_ranking(tmp_path, "m")
    assert notes == [] and ranking.folder == tmp_path / "m" / "2026-02-01_000000"
    assert ranking.layers == [1, 2] and ranking.n_prompts == 3 and ranking.depth_range == [0.4, 0.85]
    assert [(h.rank, h.layer, h.head, h.mean, h.top_rate) for h in ranking.heads] == [
        (0, 2, 1, 0.5, 1.0), (1, 1, 0, 0.25, 0.5)]
    assert ranking.rank_of(1, 0).rank == 1 and ranking.rank_of(0, 0) is None
    record = ranking.as_record(tmp_path)
    assert record["folder"] == "m/2026-02-01_000000" and record["ranking"][0] == {
        "rank": 0, "layer": 2, "head": 1, "mean": 0.5, "top_rate": 1.0}


@pytest.mark.parametrize("broken, why", [
    ("{not json", "could not be read"),
    ({k: v for k, v in GOOD.items() if k != "head_ranking"}, "KeyError"),
    (dict(GOOD, head_ranking=[{"layer": "2", "head": 1, "mean": 0.5, "top_rate": 1.0}]), "TypeError"),
    (dict(GOOD, head_ranking=[{"layer": 2, "head": 1, "mean": True, "top_rate": 1.0}]), "TypeError"),
    (dict(GOOD, layers="1-2"), "TypeError"),
    ([GOOD], "TypeError"),
])
def test_a_run_in_another_form_is_passed_over_with_a_note(tmp_path, broken, why):
    _write_run(tmp_path, "m", "2026-01-01_000000", GOOD)
    _write_run(tmp_path, "m", "2026-02-01_000000", broken)
    ranking, notes = read_head_ranking(tmp_path, "m")
    assert ranking.folder.name == "2026-01-01_000000"  # the older, readable run
    assert len(notes) == 1 and "2026-02-01_000000" in notes[0] and why in notes[0]


def test_no_run_gives_none_and_no_error(tmp_path):
    assert read_head_ranking(tmp_path / "missing", "m") == (None, [])
    _write_run(tmp_path, "m", "2026-01-01_000000", {"layers": []})
    ranking, notes = read_head_ranking(tmp_path, "m")
    assert ranking is None and len(notes) == 1


def test_reads_what_002_really_writes(tmp_path, tiny_folders):
    """The schema against a real 002 run (a tiny model, in this process): if 002's results.json moves on,
    this fails instead of 003 silently losing its 002 column."""
    from common.config import parse_toggles
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "The capital of France is", "target": "Paris"},
                                   {"prompt": "Romeo and Juliet was written by William", "target": "Shakespeare"}]))
    spec = importlib.util.spec_from_file_location("run_002_for_reader", REPO / "002_attention_patterns/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with torch.set_grad_enabled(True):
        folder = module.main(parse_toggles(vars(module), [f"--OUT_DIR={tmp_path / 'out'}", f"--PROMPTS_FILE={prompts}",
                                                          f"--MODEL={tiny_folders['llama']}", "--TOP_HEADS=2"]))
    written = json.loads((folder / "results.json").read_text())
    ranking, notes = read_head_ranking(tmp_path / "out", folder.parent.name)
    assert notes == [] and ranking.folder == folder and ranking.layers == written["layers"]
    assert ranking.n_prompts == 2 and len(ranking.heads) == len(written["head_ranking"]) > 0
    assert [(h.layer, h.head, h.mean) for h in ranking.heads] == [
        (h["layer"], h["head"], h["mean"]) for h in written["head_ranking"]]


def test_the_latest_link_is_not_taken_for_a_run(tmp_path):
    _write_run(tmp_path, "m", "2026-01-01_000000", GOOD)
    (tmp_path / "m" / "latest").symlink_to("2026-01-01_000000", target_is_directory=True)
    ranking, _ = read_head_ranking(tmp_path, "m")
    assert ranking.folder.name == "2026-01-01_000000"
