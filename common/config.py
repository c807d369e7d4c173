"""Toggles: the UPPER_CASE settings at the top of each run.py, and `--NAME=VALUE` overrides.

    python 001_layers_and_logits/run.py --USE_NORM_LENS=False --TOP_K=10
    python 001_layers_and_logits/run.py --help

A VALUE is read as a Python literal (True, 3, 0.7, [0.5, 1.0], None) and, when it is not one, as a
plain string (--MODEL=Qwen/Qwen3-8B). An unknown NAME or a value of the wrong type stops the run
before any model is loaded: exit code 2 and one line naming the valid toggles.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

from .errors import install_error_handler

# Toggles every experiment has, with the values they may take.
COMMON_CHOICES = {
    "DEVICE": ("auto", "mps", "cuda", "cpu"),
    "DTYPE": ("auto", "float16", "bfloat16", "float32"),
}
# Toggles every experiment (MAX_MEMORY_GB) or some (BATCH_SIZE) have whose value is not of one type:
# NAME -> (test of a value, what is allowed).
COMMON_RULES = {
    "MAX_MEMORY_GB": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                      "None (use what is free) or a number of GB above 0 like 12"),
    "BATCH_SIZE": (lambda v: v == "auto" or isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   "'auto' or a whole number of at least 1 like 8"),
}


class Config(SimpleNamespace):
    """The toggles of one run, read as attributes: cfg.MODEL, cfg.USE_NORM_LENS, ..."""

    def as_dict(self) -> dict:
        return dict(vars(self))


def _toggle_comments(source_file: str) -> dict[str, str]:
    """Map each top-level UPPER_CASE assignment in a file to its trailing `# comment`, in file order."""
    text = Path(source_file).read_text()
    names_by_line = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper():
                names_by_line[node.end_lineno] = name
    comments = {name: "" for name in names_by_line.values()}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in names_by_line:
            comments[names_by_line[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return comments


def _parse_value(text: str):
    """A Python literal when the text is one, else the text itself as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


_BAD = object()  # marks a value that does not fit its toggle


def _coerce(value, default):
    """Return `value` made to fit the type of `default`, or _BAD when it cannot fit."""
    if default is None:
        return value  # a None default (e.g. PROMPTS_FILE = None) takes a value of any type
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _BAD
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _BAD
    if isinstance(default, str):
        if value is None:
            return _BAD
        return value if isinstance(value, str) else str(value)  # --MODEL=123 means the string "123"
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            value = [value]  # --TEMPERATURES=1.0 means [1.0]
        return type(default)(value)
    return value if isinstance(value, type(default)) else _BAD


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def _usage_exit(message: str, toggles: dict):
    print(f"Error: {message} Valid toggles: {', '.join(toggles)} (see --help).", file=sys.stderr)
    sys.exit(2)


def parse_toggles(module_globals: dict, argv: list[str] | None = None, choices: dict | None = None) -> Config:
    """Collect the UPPER_CASE toggles of a run.py, apply `--NAME=VALUE` overrides, return a Config.

    module_globals: the run.py's `globals()`; its UPPER_CASE names are the toggles.
    argv: the command-line arguments (default: sys.argv[1:]).
    choices: {NAME: allowed values} for toggles that take one of a few values; DEVICE and DTYPE
        are checked always.
    Also installs the handler that prints a LabError as one line instead of a traceback.
    """
    install_error_handler()
    argv = sys.argv[1:] if argv is None else argv
    source_file = module_globals.get("__file__")
    comments = _toggle_comments(source_file) if source_file else {}
    # A toggle is an UPPER_CASE assignment with a comment (the contract); other constants are not.
    toggles = {name: module_globals[name] for name, comment in comments.items() if comment and name in module_globals}
    if not toggles:  # no file to read (e.g. an interactive session): every UPPER_CASE global is a toggle
        toggles = {k: v for k, v in module_globals.items() if k.isupper() and not k.startswith("_")}
    allowed = {**COMMON_CHOICES, **(choices or {})}

    if "--help" in argv or "-h" in argv:
        doc = (module_globals.get("__doc__") or "").strip()
        if doc:
            print(doc + "\n")
        print("Toggles (edit them at the top of the file, or override one run with --NAME=VALUE):")
        for name, value in toggles.items():
            comment = comments.get(name, "")
            print(f"  {name} = {value!r}" + (f"  # {comment}" if comment else ""))
        sys.exit(0)

    values = dict(toggles)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            _usage_exit(f"'{arg}' is not of the form --NAME=VALUE.", toggles)
        name, text = arg[2:].split("=", 1)
        if name not in toggles:
            _usage_exit(f"unknown toggle '{name}'.", toggles)
        value = _parse_value(text) if name in COMMON_RULES else _coerce(_parse_value(text), toggles[name])
        if value is _BAD:
            _usage_exit(f"{name} must be a {_type_name(toggles[name])} like {toggles[name]!r}, not '{text}'.",
                        toggles)
        values[name] = value

    for name, options in allowed.items():
        if name in values and values[name] not in options:
            _usage_exit(f"{name} must be one of {', '.join(map(repr, options))}, not {values[name]!r}.", toggles)
    for name, (valid, allowed_text) in COMMON_RULES.items():
        if name in values and not valid(values[name]):
            _usage_exit(f"{name} must be {allowed_text}, not {values[name]!r}.", toggles)
    return Config(**values)
