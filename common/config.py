"""Toggles: the settings at the top of each run.py, and `--NAME=VALUE` overrides.

    python 001_layers_and_logits/run.py --USE_NORM_LENS=False --TOP_K=10
    python 001_layers_and_logits/run.py --help

A toggle is found by its place: every `NAME = value  # comment` line above the marker line
`# ---...--- end of toggles` is one; constants below the marker are not. Its comment says what it does; a
comment that starts with `one of A, B or C:` also declares the values the toggle may take, which are checked:

    DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu

A VALUE is read as a Python literal (True, 3, 0.7, [0.5, 1.0], None) and, when it is not one, as a
plain string (--MODEL=Qwen/Qwen3-8B). An unknown NAME or a value of the wrong type stops the run
before any model is loaded: exit code 2 and one line naming the valid toggles.
"""
from __future__ import annotations

import ast
import io
import os
import re
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

from .errors import install_error_handler

END_OF_TOGGLES = re.compile(r"^# -+ end of toggles\s*$", re.M)
CHOICES = re.compile(r"^one of (.+?):(\s|$)")  # the start of a comment that declares a toggle's values

# Toggles some experiments have whose value is not of one type: NAME -> (test of a value, what is allowed).
VALUE_RULES = {
    "MAX_MEMORY_GB": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                      "None (use what is free) or a number of GB above 0 like 12"),
    "BATCH_SIZE": (lambda v: v == "auto" or isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                   "'auto' or a whole number of at least 1 like 8"),
}


class Config(SimpleNamespace):
    """The toggles of one run, read as attributes: cfg.MODEL, cfg.USE_NORM_LENS, ..."""

    def as_dict(self) -> dict:
        return dict(vars(self))


def toggle_comments(source_file: str) -> dict[str, str]:
    """Each assignment above the end-of-toggles marker of a run.py -> its trailing `# comment`, in file order."""
    text = Path(source_file).read_text()
    marker = END_OF_TOGGLES.search(text)
    if marker is None:
        raise ValueError(f"{source_file} has no '# ----- end of toggles' line below its toggles")
    last_line = text[: marker.start()].count("\n")
    names_by_line = {node.end_lineno: node.targets[0].id for node in ast.parse(text).body
                     if isinstance(node, ast.Assign) and node.end_lineno <= last_line
                     and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)}
    comments = {name: "" for name in names_by_line.values()}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] in names_by_line:
            comments[names_by_line[tok.start[0]]] = tok.string.lstrip("# ").strip()
    return comments


def declared_choices(comment: str) -> tuple | None:
    """The values a comment `one of "a", "b" or "c": ...` allows (("a", "b", "c")), or None."""
    match = CHOICES.match(comment)
    if match is None:
        return None
    return tuple(ast.literal_eval("[" + match.group(1).replace(" or ", ", ") + "]"))


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


def parse_toggles(module_globals: dict, argv: list[str] | None = None) -> Config:
    """Collect the toggles of a run.py (above its end-of-toggles line), apply `--NAME=VALUE`, return a Config.

    module_globals: the run.py's `globals()` (its `__file__` is read for the toggles and their comments).
    argv: the command-line arguments (default: sys.argv[1:]).
    Also installs the handler that prints a LabError as one line instead of a traceback.
    """
    install_error_handler()
    argv = sys.argv[1:] if argv is None else argv
    comments = toggle_comments(module_globals["__file__"])
    toggles = {name: module_globals[name] for name in comments}
    if "--help" in argv or "-h" in argv:
        _print_help(module_globals.get("__doc__"), toggles, comments)
    values = dict(toggles)
    for arg in argv:
        name, value = _override(arg, toggles)
        values[name] = value
    for name, comment in comments.items():
        options = declared_choices(comment)
        if options is not None and values[name] not in options:
            _usage_exit(f"{name} must be one of {', '.join(map(repr, options))}, not {values[name]!r}.", toggles)
    for name, (valid, allowed_text) in VALUE_RULES.items():
        if name in values and not valid(values[name]):
            _usage_exit(f"{name} must be {allowed_text}, not {values[name]!r}.", toggles)
    return Config(**values)


def _print_help(doc: str | None, toggles: dict, comments: dict):
    lines = [doc.strip() + "\n"] if doc and doc.strip() else []
    lines.append("Toggles (edit them at the top of the file, or override one run with --NAME=VALUE):")
    lines += [f"  {name} = {value!r}" + (f"  # {comments[name]}" if comments[name] else "")
              for name, value in toggles.items()]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `--help | head` closed the pipe early: nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so Python's exit flush stays quiet
    sys.exit(0)


def _override(arg: str, toggles: dict) -> tuple[str, object]:
    """One `--NAME=VALUE` argument -> (NAME, value fitted to the toggle's type); exit 2 when it does not fit."""
    if not arg.startswith("--") or "=" not in arg:
        _usage_exit(f"'{arg}' is not of the form --NAME=VALUE.", toggles)
    name, text = arg[2:].split("=", 1)
    if name not in toggles:
        _usage_exit(f"unknown toggle '{name}'.", toggles)
    value = _parse_value(text) if name in VALUE_RULES else _coerce(_parse_value(text), toggles[name])
    if value is _BAD:
        _usage_exit(f"{name} must be a {_type_name(toggles[name])} like {toggles[name]!r}, not '{text}'.", toggles)
    return name, value
