"""Run folders: one new folder per run, never overwriting, and none left by an interrupted run."""
import json

import pytest

from common.report import markdown_table, md_escape, new_run_folder


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    paths = []
    for i in range(3):
        with new_run_folder(tmp_path, "m") as run:
            run.write_json("results.json", {"i": i})
        paths.append(run.final_path)
    assert len(set(paths)) == 3
    assert [json.loads((p / "results.json").read_text())["i"] for p in paths] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(p.name for p in paths)


def test_an_interrupted_run_leaves_no_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with new_run_folder(tmp_path, "m") as run:
            run.write_json("results.json", {"partial": True})
            raise KeyboardInterrupt
    assert list((tmp_path / "m").iterdir()) == []


def test_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        with new_run_folder(tmp_path, "m") as run:
            run.write_json("results.json", {"x": float("nan")})
    assert list((tmp_path / "m").iterdir()) == []


def test_markdown_table_uses_six_decimals():
    table = markdown_table(["token", "p"], [[md_escape(" Paris"), 0.5], [md_escape("a|b\n"), 1e-7]])
    assert "| ` Paris` | 0.500000 |" in table
    assert "`a\\|b\\n`" in table and "0.000000" in table
