"""Toggles: --NAME=VALUE overrides, types, choices, --help, and the exit-2 errors."""
import pytest

from common.config import declared_choices, parse_toggles, toggle_comments
from conftest import REPO

SOURCE = '''"""A test experiment."""
MODEL = "smollm2-135m"  # which model
USE_NORM_LENS = True  # apply the final norm
TOP_K = 5  # how many tokens
TEMPERATURE = 1.0  # softmax temperature
TEMPERATURES = [0.5, 1.0]  # several temperatures
DEPTH_RANGE = (0.4, 0.85)  # a band of depth
PROMPTS_FILE = None  # optional file
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": device
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": dtype
# ----------------------------------------------------------------------------- end of toggles
HERE = "not a toggle: below the marker"  # even with a comment
'''


@pytest.fixture
def module_globals(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(SOURCE)
    namespace = {"__file__": str(path), "__doc__": "A test experiment."}
    exec(compile(SOURCE, str(path), "exec"), namespace)
    return namespace


def test_defaults(module_globals):
    cfg = parse_toggles(module_globals, [])
    assert cfg.MODEL == "smollm2-135m" and cfg.TOP_K == 5 and cfg.PROMPTS_FILE is None
    assert set(cfg.as_dict()) == {"MODEL", "USE_NORM_LENS", "TOP_K", "TEMPERATURE", "TEMPERATURES", "DEPTH_RANGE",
                                  "PROMPTS_FILE", "DEVICE", "DTYPE"}


def test_overrides_are_python_literals_or_strings(module_globals):
    cfg = parse_toggles(module_globals, ["--USE_NORM_LENS=False", "--TOP_K=10", "--TEMPERATURE=2",
                                         "--TEMPERATURES=[0.1, 3]", "--DEPTH_RANGE=[0.2, 0.5]",
                                         "--MODEL=Qwen/Qwen3-8B", "--PROMPTS_FILE=my prompts.json"])
    assert cfg.USE_NORM_LENS is False and cfg.TOP_K == 10
    assert cfg.TEMPERATURE == 2.0 and isinstance(cfg.TEMPERATURE, float)
    assert cfg.TEMPERATURES == [0.1, 3] and cfg.DEPTH_RANGE == (0.2, 0.5)
    assert cfg.MODEL == "Qwen/Qwen3-8B" and cfg.PROMPTS_FILE == "my prompts.json"


@pytest.mark.parametrize("arg, fragment", [
    ("--TOP_KK=3", "unknown toggle 'TOP_KK'"),
    ("--USE_NORM_LENS=yes", "USE_NORM_LENS must be a bool"),
    ("--TOP_K=2.5", "TOP_K must be a int"),
    ("--TOP_K=True", "TOP_K must be a int"),
    ("--TEMPERATURE=hot", "TEMPERATURE must be a float"),
    ("--DEVICE=tpu", "DEVICE must be one of"),
    ("--DTYPE=int8", "DTYPE must be one of"),
    ("TOP_K=3", "is not of the form --NAME=VALUE"),
])
def test_bad_toggles_exit_2_with_one_line(module_globals, capsys, arg, fragment):
    with pytest.raises(SystemExit) as exit_info:
        parse_toggles(module_globals, [arg])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1
    assert "Valid toggles: MODEL, USE_NORM_LENS" in err


def test_help_lists_every_toggle_with_its_comment(module_globals, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_toggles(module_globals, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "A test experiment." in out
    assert "USE_NORM_LENS = True  # apply the final norm" in out
    assert "DEPTH_RANGE = (0.4, 0.85)  # a band of depth" in out


def test_help_into_a_closed_pipe_is_quiet(module_globals, tmp_path):
    """`run.py --help | head -1`: the reader leaves early; the help must not end in a BrokenPipeError traceback."""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(SOURCE + "import sys\nsys.path.insert(0, %r)\nfrom common.config import parse_toggles\n"
                      "parse_toggles(globals())\n" % str(REPO))
    process = subprocess.Popen([sys.executable, str(script), "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the script has started writing: its print meets a closed pipe
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_choices_are_declared_in_the_comment(tmp_path, capsys):
    source = SOURCE.replace('MODEL = "smollm2-135m"  # which model', 'MODEL = "a"  # one of "a", "b" or None: which')
    path = tmp_path / "run.py"
    path.write_text(source)
    namespace = {"__file__": str(path)}
    exec(compile(source, str(path), "exec"), namespace)
    assert declared_choices('one of "a", "b" or None: which') == ("a", "b", None)
    assert declared_choices("which model, one of many") is None
    assert parse_toggles(namespace, ["--MODEL=b"]).MODEL == "b"
    with pytest.raises(SystemExit):
        parse_toggles(namespace, ["--MODEL=x"])
    assert "MODEL must be one of 'a', 'b', None, not 'x'" in capsys.readouterr().err


def test_a_run_py_without_the_marker_is_refused(tmp_path):
    path = tmp_path / "run.py"
    path.write_text('MODEL = "a"  # which\n')
    with pytest.raises(ValueError, match="end of toggles"):
        parse_toggles({"__file__": str(path), "MODEL": "a"}, [])


def test_constants_below_the_marker_are_not_toggles(module_globals, capsys):
    assert "HERE" not in parse_toggles(module_globals, []).as_dict()
    with pytest.raises(SystemExit):
        parse_toggles(module_globals, ["--HERE=x"])
    assert "unknown toggle 'HERE'" in capsys.readouterr().err


def test_every_experiment_has_the_common_toggles():
    import runpy
    from pathlib import Path
    for script in sorted(Path(__file__).resolve().parent.parent.glob("0*_*/run.py")):
        namespace = runpy.run_path(str(script), run_name="not_main")
        cfg = parse_toggles(namespace, [])
        assert {"MODEL", "DEVICE", "DTYPE", "OUT_DIR", "SEED"} <= set(cfg.as_dict()), script
        comments = toggle_comments(str(script))
        assert declared_choices(comments["DEVICE"]) == ("auto", "mps", "cuda", "cpu"), script
        assert all(comments.values()), f"{script}: every toggle has a comment"
