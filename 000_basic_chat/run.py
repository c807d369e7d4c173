"""000 - Basic chat: talk to a model to get to know it, and peek into its layers.

A chat in the terminal with any model of the lab, through the model's own chat template. Answers stream
as they are generated and stop at the model's end-of-turn token (for SmolLM2 `<|im_end|>`), which is
never printed. A base model without a chat template continues each message as plain text.

Commands: /reset, /temp 0.7, /system <text>, /lens (the last answer's first token at each key layer
under the NORM lens, as in 001), /help, /quit. Ctrl-C stops an answer and returns to the prompt; Ctrl-C
at the prompt, /quit or Ctrl-D leave. Set PROMPT to answer one message and exit (for scripts). When you
leave, the transcript is saved in OUT_DIR/<model>/<time>/ and the chat says where.

The model keeps its KV cache (the keys and values of every token it has read) from turn to turn, so
each turn reads only the new message, and answers start quickly however long the conversation gets.

Run:   python 000_basic_chat/run.py
       python 000_basic_chat/run.py --PROMPT="What is the capital of France?"
Help:  python 000_basic_chat/run.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # so `common` imports from any folder

# ----------------------------------------------------------------------------- toggles
MODEL = "smollm2-135m"  # embedded model, Hugging Face id (e.g. "Qwen/Qwen3-8B"), local folder or .gguf file
TEMPERATURE = 0.0  # 0 = greedy (always the most likely token, same answer every time); e.g. 0.7 samples
TOP_P = 0.9  # when sampling: draw only from the most likely tokens that together hold TOP_P of the probability
MAX_NEW_TOKENS = 256  # the longest answer, in tokens
SYSTEM_PROMPT = ""  # instructions for the model; "" = none (a chat template may add its own default)
PROMPT = None  # None = interactive chat; a message = answer it once, print the answer and exit
SEED = 0  # random seed: the same seed and the same messages give the same sampled answers
DEVICE = "auto"  # one of "auto", "mps", "cuda" or "cpu": "auto" = mps, else cuda, else cpu
DTYPE = "auto"  # one of "auto", "float16", "bfloat16" or "float32": "auto" = float16 on a GPU, bfloat16 for Gemma, float32 on the cpu
MAX_MEMORY_GB = None  # None = load into the memory that is free; a number caps the GB the model holds on the device (the rest is offloaded to CPU memory or disk: slower)
OUT_DIR = str(Path(__file__).resolve().parent / "results")  # transcripts go to OUT_DIR/<model>/<time>/
# ----------------------------------------------------------------------------- end of toggles

import contextlib  # noqa: E402
import math  # noqa: E402
import signal  # noqa: E402

import common  # noqa: E402,F401 - first: it sets PYTORCH_ENABLE_MPS_FALLBACK before torch loads
import torch  # noqa: E402

from common import report  # noqa: E402
from common.chat import QUIT, ChatSession, session_checks, transcript_markdown  # noqa: E402
from common.config import parse_toggles  # noqa: E402
from common.errors import LabError  # noqa: E402
from common.models import load_model  # noqa: E402

EXPERIMENT = Path(__file__).resolve().parent.name  # "000_basic_chat"


def check_toggles(cfg):
    """Stop with one sentence on settings that cannot work, before the model is loaded."""
    if not (math.isfinite(cfg.TEMPERATURE) and cfg.TEMPERATURE >= 0):
        raise LabError(f"TEMPERATURE must be a number >= 0 (0 = greedy), not {cfg.TEMPERATURE}.")
    if not 0 < cfg.TOP_P <= 1:
        raise LabError(f"TOP_P must be above 0 and at most 1 (1 = no cut), not {cfg.TOP_P}.")
    if cfg.MAX_NEW_TOKENS < 1:
        raise LabError(f"MAX_NEW_TOKENS must be at least 1, not {cfg.MAX_NEW_TOKENS}.")
    if cfg.PROMPT is not None and not str(cfg.PROMPT).strip():
        raise LabError("PROMPT is empty: write a message, or leave PROMPT = None for an interactive chat.")


def main(cfg):
    check_toggles(cfg)
    torch.manual_seed(cfg.SEED)  # sampled answers are reproducible for the same seed and messages
    model = load_model(cfg.MODEL, cfg.DEVICE, cfg.DTYPE, cfg.MAX_MEMORY_GB)
    session = ChatSession(model, system=cfg.SYSTEM_PROMPT, temperature=cfg.TEMPERATURE, top_p=cfg.TOP_P,
                          max_new_tokens=cfg.MAX_NEW_TOKENS)
    session.start_notes()
    if cfg.PROMPT is not None:
        session.ask(str(cfg.PROMPT))  # one-shot: only the answer goes to stdout
    else:
        chat_loop(session)
    return save_transcript(cfg, session)


def chat_loop(session):
    """Read messages and /commands until /quit, Ctrl-D (end of input) or Ctrl-C at the prompt.

    Ctrl-C during an answer is caught inside session.ask (the answer stops, the chat goes on)."""
    # Ctrl-C must raise KeyboardInterrupt even when this process was started with SIGINT ignored (a background
    # job of a script, some test runners): Python then leaves it ignored, and Ctrl-C would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - arrow keys and history in input()
        except ImportError:
            pass
    mode = "greedy" if session.temperature == 0 else f"temperature {session.temperature:g}"
    print(f"Chatting with {session.model.name} ({mode}, at most {session.max_new_tokens} tokens per answer). "
          "Type /help for commands, /quit or Ctrl-D to leave.", flush=True)
    try:
        while True:
            try:
                line = input(">>> ").strip()
            except EOFError:  # Ctrl-D, or the end of piped input
                print()
                return
            if not line:
                continue
            if line.startswith("/"):
                result = session.command(line)
                if result is QUIT:
                    return
                print(result, flush=True)
                continue
            try:
                session.ask(line)
            except LabError as exc:  # e.g. a message longer than the context: say so and go on
                print(f"Error: {exc}", file=sys.stderr, flush=True)
            print(flush=True)
    except KeyboardInterrupt:  # Ctrl-C at the prompt: leave without a traceback, keeping what was said
        print("\n(Ctrl-C: leaving.)", flush=True)


def save_transcript(cfg, session):
    """Write the run folder (results.json, report.md, config.json) when at least one answer was given."""
    answers = [h for h in session.history if h["kind"] == "answer"]
    if not answers:
        print("No answers, so no transcript was saved.", file=sys.stderr)
        return None
    model = session.model
    checks = session_checks(session)
    results = {"experiment": EXPERIMENT, "model": model.name, "chat_template": session.uses_template,
               "end_of_turn_ids": session.stop_ids, "end_of_turn_tokens": session.stop_tokens,
               "system_prompt": session.conversation.system, "history": session.history, "checks": checks}
    mode = "chat template" if session.uses_template else "no chat template: plain continuation"
    text = [f"# 000 basic chat: {model.name}", "",
            f"{mode}; device {model.device}, dtype {str(model.dtype).replace('torch.', '')}; end-of-turn tokens "
            + ", ".join(report.md_escape(t) for t in session.stop_tokens)
            + f"; at most {session.max_new_tokens} new tokens per answer; seed {cfg.SEED}.", "",
            "## Self-check", "", report.check_lines(checks), "", "## Transcript", "", transcript_markdown(session)]
    with contextlib.redirect_stdout(sys.stderr), report.new_run_folder(cfg.OUT_DIR, model.slug) as run:
        run.write_json("results.json", results)
        run.write_json("config.json", report.run_config(cfg, model, EXPERIMENT))
        run.write_text("report.md", "\n".join(text))
    failed = [c["name"] for c in checks if not c["passed"]]
    if failed:
        print(f"WARNING: self-check failed: {'; '.join(failed)} (see report.md).", file=sys.stderr)
    print(f"Transcript written to {run.final_path / 'report.md'} (numbers in results.json beside it).",
          file=sys.stderr)
    return run.final_path


if __name__ == "__main__":
    main(parse_toggles(globals()))
