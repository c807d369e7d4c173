"""000 basic chat: end to end through stdin as the user types, and common/chat.py piece by piece."""
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from common.chat import (QUIT, ChatSession, Conversation, KeptCache, ReplyStreamer, cache_layer_lengths,
                         common_prefix_length, crop_cache, drop_oldest_turns, end_of_turn_ids, generate_reply,
                         render_chat, template_end_of_turn_id)
from common.errors import LabError
from conftest import REPO, run_script

SCRIPT = "000_basic_chat/run.py"
END_OF_TURN_TEXTS = ("<|im_end|>", "<|im_start|>")
PROMPT = ">>> "


def chat_process(*args: str, stdin_text: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the chat as the user does, typing `stdin_text` (conftest.run_script passes no stdin)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / SCRIPT), *args], input=stdin_text, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def only_run_folder(out_dir):
    [folder] = [p for p in out_dir.glob("*/*") if p.is_dir() and not p.is_symlink()]
    return folder


def read_results(out_dir) -> dict:
    return json.loads((only_run_folder(out_dir) / "results.json").read_text())


def answers(results: dict) -> list[dict]:
    return [h for h in results["history"] if h["kind"] == "answer"]


# ----------------------------------------------------------------------------- one-shot mode


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory):
    out = tmp_path_factory.mktemp("oneshot")
    result = chat_process("--PROMPT=What is the capital of France?", "--TEMPERATURE=0", "--MAX_NEW_TOKENS=32",
                          f"--OUT_DIR={out}")
    return out, result


def test_one_shot_answers_paris_without_end_of_turn_text(one_shot):
    out, result = one_shot
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert not any(text in result.stdout for text in END_OF_TURN_TEXTS)
    results = read_results(out)
    [answer] = answers(results)
    assert result.stdout == answer["answer"] + "\n"  # stdout holds the answer and nothing else
    assert answer["ended_turn"] and answer["n_new_tokens"] < 32  # stopped at <|im_end|>, not at the limit
    assert results["end_of_turn_tokens"][0] == "<|im_end|>"
    assert all(check["passed"] for check in results["checks"])
    folder = only_run_folder(out)
    assert {"results.json", "config.json", "report.md"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["toggles"]["MAX_NEW_TOKENS"] == 32
    assert "PASS: no end-of-turn token text" in (folder / "report.md").read_text()


def test_greedy_output_is_identical_across_two_runs(one_shot, interactive):
    """The same greedy question in two separate runs (one-shot, and the first turn of the interactive one)."""
    (one_shot_out, one_shot_result), (interactive_out, interactive_result) = one_shot, interactive
    assert one_shot_result.returncode == 0 and interactive_result.returncode == 0
    first = answers(read_results(interactive_out))[0]
    assert first["user"] == "What is the capital of France?" and first["temperature"] == 0
    assert answers(read_results(one_shot_out))[0]["new_ids"] == first["new_ids"]
    assert one_shot_result.stdout == first["answer"] + "\n"


# ----------------------------------------------------------------------------- interactive session


SESSION = [
    "What is the capital of France?",
    "",  # empty input is ignored
    "/lens",
    "And what is the capital of Germany?",
    "/temp 0.7",
    "/temp hot",
    "/frobnicate",
    "Say hello.",
    "/reset",
    "/lens",
    "/system You are a helpful assistant who answers in one short sentence.",
    "/temp 0",
    "What is the capital of Italy?",
    "/help",
    "/quit",
    "This line comes after /quit and is never answered.",
]


@pytest.fixture(scope="module")
def interactive(tmp_path_factory):
    out = tmp_path_factory.mktemp("interactive")
    result = chat_process(f"--OUT_DIR={out}", "--MAX_NEW_TOKENS=32", stdin_text="\n".join(SESSION) + "\n")
    return out, result


def test_interactive_session_end_to_end(interactive):
    out, result = interactive
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # Each prompt is followed by what the chat printed for that line (the empty line prints nothing).
    shown = result.stdout.split(PROMPT)[1:]
    assert "Paris" in shown[0]
    assert shown[1] == ""  # the empty line: nothing, just the next prompt
    assert "NORM lens, first token of the last answer" in shown[2]
    assert "Berlin" in shown[3]
    assert "Temperature set to 0.7." in shown[4]
    assert "not a temperature" in shown[5] and len(shown[5].strip().splitlines()) == 1
    assert shown[6].strip() == "Unknown command /frobnicate: type /help for the list."
    assert "New conversation." in shown[8]
    assert "No answer yet" in shown[9]
    assert "System prompt set" in shown[10]
    assert "Rome" in shown[12]
    assert "/lens" in shown[13] and "/quit" in shown[13]
    assert len(shown) == 15  # nothing was read after /quit

    results = read_results(out)
    said = answers(results)
    assert [h["user"] for h in said] == [SESSION[0], SESSION[3], SESSION[7], SESSION[12]]
    assert [h["temperature"] for h in said] == [0.0, 0.0, 0.7, 0.0]
    assert said[3]["system"] == SESSION[10][len("/system "):]
    # Multi-turn memory: the second prompt contains the first exchange; /reset empties the conversation.
    assert said[1]["n_prompt_tokens"] > said[0]["n_prompt_tokens"] + said[0]["n_new_tokens"]
    assert said[2]["n_prompt_tokens"] > said[1]["n_prompt_tokens"]
    assert [h["kind"] for h in results["history"]].count("reset") == 1
    for h in said:
        assert not any(text in h["answer"] for text in END_OF_TURN_TEXTS)
    assert all(check["passed"] for check in results["checks"])


def test_lens_reads_the_first_answer_token(interactive):
    """/lens under greedy decoding: the NORM lens at the last layer must pick the token the chat printed."""
    out, result = interactive
    [reading] = [h for h in read_results(out)["history"] if h["kind"] == "lens"]
    assert reading["after_answer"] == 1
    assert [row["layer"] for row in reading["rows"]] == [0, 5, 10, 15, 20, 25, 30]
    last = reading["rows"][-1]
    assert last["top_token"] == reading["token"] and last["token_rank"] == 0
    assert last["top_prob"] == pytest.approx(last["token_prob"])
    assert reading["check"]["passed"]
    assert reading["resolution"]["first_top1_layer"] is not None  # greedy: top-1 at least at the last layer
    first_answer = answers(read_results(out))[0]["answer"]
    assert first_answer.startswith(reading["token"].strip())


def _read_into(stream, sink: list):
    for char in iter(lambda: stream.read(1), ""):
        sink.append(char)


def test_ctrl_c_stops_an_answer_and_a_second_ctrl_c_leaves(tmp_path):
    """A real SIGINT in the middle of a streaming answer: the answer stops, the chat goes on (from the kept
    cache); a second SIGINT at the prompt leaves with exit 0, no traceback, and the transcript saved."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen([sys.executable, str(REPO / SCRIPT), f"--OUT_DIR={tmp_path}", "--MAX_NEW_TOKENS=200"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=REPO)
    stdout, stderr = [], []
    readers = [threading.Thread(target=_read_into, args=(process.stdout, stdout), daemon=True),
               threading.Thread(target=_read_into, args=(process.stderr, stderr), daemon=True)]
    for reader in readers:
        reader.start()

    def wait_for(condition, what: str):
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None and not condition("".join(stdout).split(PROMPT)):
            time.sleep(0.05)
        assert process.poll() is None, f"the chat ended while waiting for {what}: {''.join(stderr)[-2000:]}"
        assert condition("".join(stdout).split(PROMPT)), f"timed out waiting for {what}"

    process.stdin.write("What is the capital of France?\nWrite a long story about a dragon.\n")
    process.stdin.flush()
    wait_for(lambda shown: len(shown) >= 3 and len(shown[2]) > 10, "the story to stream")
    process.send_signal(signal.SIGINT)  # first Ctrl-C: stops the story
    wait_for(lambda shown: len(shown) >= 4, "the prompt after the stopped story")
    process.stdin.write("What is the capital of Germany?\n")
    process.stdin.flush()
    wait_for(lambda shown: len(shown) >= 5, "the prompt after the next answer")
    process.send_signal(signal.SIGINT)  # second Ctrl-C, at the prompt: leaves
    try:  # leaving saves the transcript (imports matplotlib): allow for a busy CI machine
        assert process.wait(timeout=180) == 0
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the chat did not leave after the second Ctrl-C; stdout ends {''.join(stdout)[-600:]!r}, "
                    f"stderr ends {''.join(stderr)[-1500:]!r}")
    for reader in readers:
        reader.join(timeout=10)
    stdout, stderr = "".join(stdout), "".join(stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "answer stopped" in stderr and stdout.rstrip().endswith("(Ctrl-C: leaving.)")
    said = answers(read_results(tmp_path))
    assert [h["user"] for h in said] == ["What is the capital of France?", "Write a long story about a dragon.",
                                         "What is the capital of Germany?"]
    assert [h["interrupted"] for h in said] == [False, True, False]
    assert said[1]["answer"] and said[1]["answer"] in stdout.split(PROMPT)[2]  # kept as it was printed
    assert said[2]["n_cached_prompt_tokens"] > said[1]["n_prompt_tokens"]  # read only the new turn
    assert f"Transcript written to {only_run_folder(tmp_path) / 'report.md'}" in stderr


def test_base_model_continues_text_and_says_so_once(tmp_path):
    """gemma3-270m has no chat template: plain continuation, one note, and Ctrl-D (end of input) leaves."""
    result = chat_process("--MODEL=gemma3-270m", f"--OUT_DIR={tmp_path}", "--MAX_NEW_TOKENS=8",
                          "--SYSTEM_PROMPT=Be brief.", stdin_text="The capital of France is\nOnce upon a time\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("has no chat template") == 1
    results = read_results(tmp_path)
    assert results["chat_template"] is False
    said = answers(results)
    assert len(said) == 2 and all(h["n_new_tokens"] > 0 for h in said)
    # No memory between messages: each prompt is the message alone.
    assert said[1]["n_prompt_tokens"] < said[0]["n_prompt_tokens"] + said[0]["n_new_tokens"]


# ----------------------------------------------------------------------------- toggles


def test_help_lists_the_toggles_of_the_issue():
    result = run_script(SCRIPT, "--help")
    assert result.returncode == 0
    toggle_lines = result.stdout.split("Toggles")[1].splitlines()[1:]
    names = [line.split(" = ")[0].strip() for line in toggle_lines if " = " in line]
    assert names == ["MODEL", "TEMPERATURE", "TOP_P", "MAX_NEW_TOKENS", "SYSTEM_PROMPT", "PROMPT", "SEED", "DEVICE",
                     "DTYPE", "MAX_MEMORY_GB", "OUT_DIR"]



@pytest.mark.parametrize("args, fragment, code", [
    (["--NOT_A_TOGGLE=1"], "unknown toggle", 2),
    (["--TEMPERATURE=warm"], "TEMPERATURE must be a float", 2),
    (["--MAX_NEW_TOKENS=1.5"], "MAX_NEW_TOKENS must be a int", 2),
    (["--DEVICE=tpu"], "DEVICE must be one of", 2),
    (["--TEMPERATURE=-0.5"], "TEMPERATURE must be a number >= 0", 1),
    (["--TOP_P=0"], "TOP_P must be above 0", 1),
    (["--MAX_NEW_TOKENS=0"], "MAX_NEW_TOKENS must be at least 1", 1),
    (["--PROMPT=   "], "PROMPT is empty", 1),
])
def test_bad_toggles_fail_with_one_line_and_no_results(tmp_path, args, fragment, code):
    result = run_script(SCRIPT, f"--OUT_DIR={tmp_path / 'out'}", *args)
    assert result.returncode == code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("results.json"))


# ----------------------------------------------------------------------------- common/chat.py in-process


def session(model, **kwargs) -> ChatSession:
    return ChatSession(model, out=io.StringIO(), notes=io.StringIO(), **kwargs)


def test_end_of_turn_ids_of_smollm2(embedded):
    tokenizer = embedded.tokenizer
    assert tokenizer.eos_token == "<|im_start|>"  # what the GGUF tokenizer claims; turns end with <|im_end|>
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert template_end_of_turn_id(tokenizer) == im_end
    assert end_of_turn_ids(tokenizer, embedded.hf_model.generation_config) == [im_end, tokenizer.eos_token_id]


def test_end_of_turn_id_read_from_other_templates(embedded):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(embedded.folder)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    assert template_end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert template_end_of_turn_id(tokenizer) is None  # plain text after the answer is no end-of-turn token
    tokenizer.chat_template = None
    assert end_of_turn_ids(tokenizer, None) == [tokenizer.eos_token_id]


def test_conversation_messages_and_system_fallback(embedded):
    from transformers import AutoTokenizer
    conversation = Conversation("Be brief.", [("Hi", "Hello!")])
    assert conversation.messages("Bye") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    tokenizer = AutoTokenizer.from_pretrained(embedded.folder)
    text, merged = render_chat(tokenizer, conversation, "Bye")
    assert not merged and text.endswith("<|im_start|>assistant\n") and "Be brief." in text
    # A template without a system role (like Gemma-2's) raises; the system prompt then leads the first user turn.
    tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
    text, merged = render_chat(tokenizer, conversation, "Bye")
    assert merged and "<|im_start|>user\nBe brief.\n\nHi<|im_end|>" in text


def test_drop_oldest_turns():
    conversation = Conversation("", [("a", "1"), ("b", "2"), ("c", "3")])
    length = lambda: 10 + 5 * len(conversation.turns)  # noqa: E731 - a prompt that grows with each exchange
    assert drop_oldest_turns(conversation, length, budget=25) == 0
    assert drop_oldest_turns(conversation, length, budget=16) == 2
    assert conversation.turns == [("c", "3")]
    with pytest.raises(LabError, match="shorten it"):
        drop_oldest_turns(conversation, length, budget=9)
    assert conversation.turns == [("c", "3")]  # a message that cannot fit drops nothing


def test_streamer_hides_stop_tokens_and_keeps_what_it_wrote(embedded):
    tokenizer = embedded.tokenizer
    words = tokenizer("The capital of France is Paris.\nIt is big.", add_special_tokens=False).input_ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = io.StringIO()
    streamer = ReplyStreamer(tokenizer, [im_end], out)
    streamer.put(torch.tensor([[5, 6, 7]]))  # the prompt: skipped
    for token in words + [im_end]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert streamer.printed == "The capital of France is Paris.\nIt is big."
    assert out.getvalue() == streamer.printed + "\n"


def test_greedy_chat_equals_plain_hf_generate(embedded):
    """The chat's cached, streamed generation gives exactly the tokens of HF generate() without a cache."""
    chat = session(embedded, max_new_tokens=10)
    ids = chat.prompt_ids("Name three colours.")
    reply = generate_reply(embedded, ids, chat.stop_ids, 10, out=io.StringIO())
    plain = embedded.hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                       use_cache=False, eos_token_id=chat.stop_ids, pad_token_id=chat.stop_ids[0])
    assert reply.new_ids == plain[0, ids.shape[1]:].tolist()


def test_sampling_is_reproducible_with_a_seed(embedded):
    def sample(seed):
        torch.manual_seed(seed)
        return session(embedded, temperature=1.0, top_p=0.95, max_new_tokens=8).ask("Tell me about cats.").new_ids

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3))  # and the seed does matter


def test_answer_budget_must_leave_room_for_the_conversation(embedded):
    with pytest.raises(LabError, match="leaves no room"):
        session(embedded, max_new_tokens=embedded.context_length)
    with pytest.raises(LabError, match="message is empty"):
        session(embedded).ask("  ")


def test_commands(embedded):
    chat = session(embedded)
    assert chat.command("/quit") is QUIT and chat.command("/EXIT") is QUIT
    assert chat.command("/temp") == "Temperature is 0 (greedy)."
    assert chat.command("/temp 1.5") == "Temperature set to 1.5." and chat.temperature == 1.5
    for bad in ("/temp -1", "/temp nan", "/temp inf", "/temp x"):
        assert "not a temperature" in chat.command(bad)
    assert chat.temperature == 1.5
    assert "No system prompt" in chat.command("/system")
    chat.command("/system  Be kind. ")
    assert chat.conversation.system == "Be kind." and "'Be kind.'" in chat.command("/system")
    assert chat.command("/lens").startswith("No answer yet")
    assert "Unknown command /nope" in chat.command("/nope extra words")


# ----------------------------------------------------------------------------- context trimming


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_folder):
    """A tiny random Llama with a 256-token context and SmolLM2's tokenizer (so it has a chat template)."""
    from tiny_models import build_tiny_model

    from common.models import load_model
    folder = build_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", embedded_folder)
    return load_model(str(folder), "cpu", "float32")


def load_run_module():
    spec = importlib.util.spec_from_file_location("basic_chat_run", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_conversation_drops_oldest_turns(tiny_llama, monkeypatch, capsys):
    """Driven through run.py's own loop: long messages outgrow the 256-token context; the oldest exchanges
    go with a one-line note, a message too long on its own gets one error line, and the chat goes on."""
    assert tiny_llama.context_length == 256
    chat = ChatSession(tiny_llama, max_new_tokens=8)  # writes to the real stdout/stderr, captured by capsys
    message = " ".join(["word"] * 60)
    too_long = " ".join(["word"] * 300)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([message] * 5 + [too_long, "short", "/quit"]) + "\n"))
    load_run_module().chat_loop(chat)
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("(The conversation outgrew")]
    assert notes and all("dropped the oldest" in line for line in notes)
    errors = [line for line in captured.err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "shorten it" in errors[0]
    said = [h for h in chat.history if h["kind"] == "answer"]
    assert len(said) == 6 and said[-1]["user"] == "short"
    assert all(h["n_prompt_tokens"] <= 256 - 8 for h in said)
    assert "Traceback" not in captured.err


# ----------------------------------------------------------------------------- the KV cache kept across turns


TURNS = ["What is the capital of France?", "And of Germany?", "Write a haiku about Berlin.", "Count to five."]


def plain_generate(model, chat: ChatSession, prompt_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy ids from plain HF generate() on the whole conversation: a fresh cache, everything read."""
    out = model.hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                  max_new_tokens=max_new_tokens, eos_token_id=chat.stop_ids,
                                  pad_token_id=chat.stop_ids[0])
    return out[0, prompt_ids.shape[1]:].tolist()


def assert_cache_holds(model, kept):
    """The kept cache holds, in every layer, the keys and values a fresh forward pass over kept.ids gives."""
    assert kept.cache is not None and kept.ids
    fresh = model.hf_model(torch.tensor([kept.ids]), use_cache=True).past_key_values
    assert len(fresh.layers) == len(kept.cache.layers)
    for ours, theirs in zip(kept.cache.layers, fresh.layers):
        assert ours.keys.shape == theirs.keys.shape
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-4) and torch.allclose(ours.values, theirs.values,
                                                                                     atol=1e-4)


def test_kept_cache_reads_only_the_new_turn_and_answers_like_hf_generate(embedded):
    chat = session(embedded, max_new_tokens=24)
    previous = None
    for message in TURNS:
        reply = chat.ask(message)
        assert reply.new_ids == plain_generate(embedded, chat, reply.prompt_ids, 24)
        if previous is not None:  # the whole previous prompt and answer came from the cache
            assert reply.n_cached == previous.prompt_ids.shape[1] + len(previous.new_ids) - 1
            # ... that is the previous prompt and answer, its end-of-turn token as the template writes it
            assert (reply.prompt_ids[0, :reply.n_cached + 1].tolist()
                    == previous.prompt_ids[0].tolist() + previous.new_ids)
        assert_cache_holds(embedded, chat.kept)
        assert len(chat.kept.ids) == reply.prompt_ids.shape[1] + len(reply.new_ids) - 1
        previous = reply
    said = answers({"history": chat.history})
    assert [h["n_cached_prompt_tokens"] > 0 for h in said] == [False, True, True, True]


def test_kept_cache_on_tiny_models_answers_like_hf_generate(tiny):
    """Every architecture (Gemma-2's sliding window of 64 is outgrown by turn 3) and SmolLM2's template."""
    chat = session(tiny, max_new_tokens=12)
    for message in TURNS[:3]:
        reply = chat.ask(message)
        assert reply.new_ids == plain_generate(tiny, chat, reply.prompt_ids, 12)
    assert chat.kept.ids == [] or set(cache_layer_lengths(chat.kept.cache)) == {len(chat.kept.ids)}


def test_a_template_that_rewrites_earlier_turns_falls_back_to_reading_everything(embedded):
    """Like Qwen3's template dropping earlier thinking blocks: the cached ids stop being a prefix of the new
    prompt. Here the template starts with the number of messages, so the prompts differ from their start."""
    template = embedded.tokenizer.chat_template
    embedded.tokenizer.chat_template = "{{ messages | length }} messages\n" + template
    try:
        chat = session(embedded, max_new_tokens=12)
        for message in TURNS[:3]:
            reply = chat.ask(message)
            assert reply.n_cached == 0
            assert reply.new_ids == plain_generate(embedded, chat, reply.prompt_ids, 12)
    finally:
        embedded.tokenizer.chat_template = template


def test_system_prompt_change_and_reset_keep_only_what_still_matches(embedded):
    chat = session(embedded, max_new_tokens=12)
    chat.ask(TURNS[0])
    first_prompt = chat.last.prompt_ids[0].tolist()
    chat.command("/system Answer in French.")  # changes the prompt a few tokens in: only that much is reused
    reply = chat.ask(TURNS[1])
    assert 0 < reply.n_cached == common_prefix_length(first_prompt, reply.prompt_ids[0].tolist()) < 10
    assert reply.new_ids == plain_generate(embedded, chat, reply.prompt_ids, 12)
    chat.command("/temp 0.5")  # sampling settings do not touch the cache
    assert len(chat.kept.ids) == reply.prompt_ids.shape[1] + len(reply.new_ids) - 1
    chat.command("/reset")
    assert chat.kept.cache is None and chat.kept.ids == []


def test_crop_cache_and_prefix(embedded):
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_length([], [1]) == 0
    kept = KeptCache(embedded.hf_model.config)
    ids = embedded.tokenizer("The capital of France is Paris.").input_ids
    cache, n = kept.for_prompt(ids)
    assert n == 0 and cache.get_seq_length() == 0  # nothing kept yet: a fresh cache
    embedded.hf_model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
    kept.keep(ids + [0])  # as after generate(): the last id was never read
    assert kept.ids == ids
    cache, n = kept.for_prompt(ids)  # the same prompt again: one token is left for generate() to read
    assert n == len(ids) - 1 and cache_layer_lengths(cache) == [n] * embedded.n_layers
    assert_cache_holds(embedded, kept)
    assert crop_cache(cache, 2) and cache.get_seq_length() == 2
    assert not crop_cache(cache, 5)  # it cannot grow back


# ----------------------------------------------------------------------------- Ctrl-C during an answer


class CtrlCAt:
    """A forward hook on one decoder layer that raises KeyboardInterrupt (as Ctrl-C does) on its n-th call:
    in the middle of a forward pass, so the layers before it have written one more position than the rest."""

    def __init__(self, model, call: int, layer: int = 10):
        self.calls, self.call = 0, call
        self.handle = model.hf_model.model.layers[layer].register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.call:
            self.handle.remove()
            raise KeyboardInterrupt


def test_ctrl_c_stops_the_answer_keeps_it_and_the_cache_stays_right(embedded):
    out = io.StringIO()
    chat = ChatSession(embedded, max_new_tokens=48, out=out, notes=io.StringIO())
    chat.ask(TURNS[0])
    CtrlCAt(embedded, call=8)  # 1 prefill + 6 steps done: 7 tokens generated, the 8th forward cut
    reply = chat.ask("Write a long story about a dragon.")
    assert reply.interrupted and not reply.ended_turn and len(reply.new_ids) == 7
    assert reply.text and reply.printed == reply.text and out.getvalue().endswith(reply.text + "\n")
    assert chat.conversation.turns[-1] == ("Write a long story about a dragon.", reply.text)
    assert chat.history[-1]["interrupted"] and "Ctrl-C" in chat.notes.getvalue()
    # The cache was cut back to what every layer holds: prompt + 6 answer tokens, identical to a fresh read.
    assert chat.kept.ids == reply.prompt_ids[0].tolist() + reply.new_ids[:6]
    assert_cache_holds(embedded, chat.kept)
    after = chat.ask(TURNS[1])  # the chat goes on, from the kept cache, like plain generate
    assert after.n_cached > reply.prompt_ids.shape[1] and not after.interrupted
    assert after.new_ids == plain_generate(embedded, chat, after.prompt_ids, 48)


def test_ctrl_c_before_the_first_token_keeps_nothing(embedded):
    chat = session(embedded, max_new_tokens=16)
    first = chat.ask(TURNS[0])
    CtrlCAt(embedded, call=1)  # during the prefill
    reply = chat.ask(TURNS[1])
    assert reply.interrupted and reply.new_ids == [] and reply.first_token_seconds is None
    assert chat.conversation.turns == [(TURNS[0], first.text)] and chat.last is first
    assert chat.kept.ids == [] or len(chat.kept.ids) <= reply.prompt_ids.shape[1]
    if chat.kept.ids:
        assert_cache_holds(embedded, chat.kept)
    assert chat.ask(TURNS[1]).new_ids == plain_generate(embedded, chat, chat.last.prompt_ids, 16)


def test_chat_loop_ctrl_c_stops_an_answer_then_leaves_at_the_prompt(embedded, monkeypatch, capsys):
    """run.py's loop without a terminal: Ctrl-C in an answer returns to the prompt; Ctrl-C there leaves."""
    typed = iter(["Write a long story about a dragon.", "What is the capital of France?", KeyboardInterrupt,
                  "never read"])

    def fake_input(prompt):
        print(prompt, end="")
        item = next(typed)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # not a terminal
    chat = ChatSession(embedded, max_new_tokens=24)  # writes to the real stdout/stderr, captured by capsys
    CtrlCAt(embedded, call=5)
    load_run_module().chat_loop(chat)
    captured = capsys.readouterr()
    said = [h for h in chat.history if h["kind"] == "answer"]
    assert [h["interrupted"] for h in said] == [True, False]
    assert "Paris" in said[1]["answer"] and said[1]["n_cached_prompt_tokens"] > 0
    assert "answer stopped" in captured.err and captured.out.rstrip().endswith("(Ctrl-C: leaving.)")
    assert captured.out.count(PROMPT) == 3 and next(typed) == "never read"
    assert "Traceback" not in captured.err
