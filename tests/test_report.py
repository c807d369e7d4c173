"""Run folders: one new folder per run, never overwriting, and none left by an interrupted run."""
import json
import os

import pytest

from common.report import finish_run, markdown_table, md_escape, new_run_folder


def test_two_runs_in_the_same_second_get_two_folders(tmp_path):
    paths = []
    for i in range(3):
        with new_run_folder(tmp_path, "m") as run:
            run.write_json("results.json", {"i": i})
        paths.append(run.final_path)
    assert len(set(paths)) == 3
    assert [json.loads((p / "results.json").read_text())["i"] for p in paths] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([p.name for p in paths] + ["latest"])
    assert (tmp_path / "m" / "latest").resolve() == paths[-1].resolve()  # the newest run
    assert os.readlink(tmp_path / "m" / "latest") == paths[-1].name  # relative: survives moving the repo


def test_a_run_ends_by_saying_what_to_open_and_what_it_found(tmp_path, capsys):
    with new_run_folder(tmp_path, "m") as run:
        run.write_text("report.md", "# report")
    finish_run(run.final_path, ["' Paris' becomes top-1 at layer 30 of 30 (100% depth)."], ["lens == logits"])
    out = capsys.readouterr().out
    assert f"Run folder: {run.final_path}" in out and f"open {run.final_path / 'report.md'}" in out
    assert "  - ' Paris' becomes top-1 at layer 30 of 30 (100% depth)." in out
    assert "WARNING: 1 self-check(s) failed (lens == logits)" in out


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
