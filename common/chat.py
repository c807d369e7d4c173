"""Chatting with a loaded model: conversation state, context trimming, end-of-turn ids, streaming replies.

Everything here works on a LoadedModel's plain Hugging Face model (`hf_model.generate`, KV cache on),
never on `model.bridge`: booting the bridge wraps the HF modules and slows every forward (NOTES.md).
Nothing here reads a terminal: text goes to file-like objects, so tests drive it with io.StringIO.

  session = ChatSession(model, out=sys.stdout, notes=sys.stderr)
  session.ask("What is the capital of France?")   # streams the answer to `out`, keeps the turn
  session.command("/lens")                          # the first answer token through the NORM lens

A model with a chat template gets multi-turn chat through that template; a base model (no template)
gets plain continuation of each message on its own.

The KV cache is kept across turns (KeptCache): each turn the whole conversation is rendered through the
template, and only the tokens the cache does not already hold are read ("prefilled"); greedy answers are
the tokens plain `generate` gives on the whole conversation (tested). Ctrl-C during an answer stops that
answer (ChatSession.ask catches the KeyboardInterrupt), keeps what was said, and cuts the cache back to
what it holds consistently.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, TextStreamer

from . import lens
from .errors import LabError
from .prompts import encode, strip_duplicate_bos

# decode() settings for everything shown or kept: no special-token text, and the text exactly as the
# tokens spell it (no "clean-up" of spaces before punctuation, which a streamer would apply per chunk).
DECODE = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)

HELP = """Commands:
  /reset          start a new conversation (keeps the system prompt and temperature)
  /temp 0.7       set the sampling temperature (0 = greedy: always the most likely token)
  /system <text>  set the system prompt (/system alone shows it)
  /lens           the last answer's first token at each key layer, under the NORM lens
  /help           this list
  /quit           leave (Ctrl-D leaves too; Ctrl-C stops an answer, and at the prompt leaves)"""

QUIT = object()  # returned by ChatSession.command when the user asks to leave


# ----------------------------------------------------------------------------- end-of-turn tokens


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


def _is_special(tokenizer, token_id: int) -> bool:
    added = tokenizer.added_tokens_decoder.get(token_id)
    return token_id in tokenizer.all_special_ids or bool(added is not None and added.special)


def template_end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message, if any.

    Found by rendering a one-exchange conversation and reading what follows the assistant's text:
    `<|im_end|>` (SmolLM2, Qwen3), `<|eot_id|>` (Llama-3), `<end_of_turn>` (Gemma), `</s>` (Mistral).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "LAB-END-OF-TURN-PROBE"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - templates raise all kinds of errors; then we rely on the eos ids
        return None
    if marker not in text:
        return None
    after = text[text.rindex(marker) + len(marker):]
    ids = tokenizer(after, add_special_tokens=False).input_ids if after else []
    return int(ids[0]) if ids and _is_special(tokenizer, int(ids[0])) else None


def end_of_turn_ids(tokenizer, generation_config) -> list[int]:
    """The token ids that end the model's turn: generation stops at any of them and never shows them.

    The union, in this order, of generation_config.eos_token_id (int or list), the end-of-turn token of
    the chat template, and tokenizer.eos_token_id. The union matters: SmolLM2's GGUF tokenizer reports
    `<|im_start|>` as its eos, while its turns end with `<|im_end|>` (the generation config's eos).
    """
    ids = _as_list(getattr(generation_config, "eos_token_id", None))
    ids += _as_list(template_end_of_turn_id(tokenizer))
    ids += _as_list(tokenizer.eos_token_id)
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise LabError("This model defines no end-of-turn or end-of-text token: it cannot tell when an answer "
                       "ends; pick another MODEL.")
    return unique


# ----------------------------------------------------------------------------- the conversation


@dataclass
class Conversation:
    """What the model is shown: a system prompt and the finished exchanges, oldest first."""
    system: str = ""  # "" = no system message (the template may write its own default)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant)

    def messages(self, user_message: str, system_in_first_user: bool = False) -> list[dict]:
        """Chat messages ending with the new user message.

        system_in_first_user: put the system prompt in front of the first user message instead of a
        system message (for templates without a system role, e.g. Gemma-2).
        """
        users = [u for u, _ in self.turns] + [user_message]
        if self.system and system_in_first_user:
            users[0] = f"{self.system}\n\n{users[0]}"
        messages = [{"role": "system", "content": self.system}] if self.system and not system_in_first_user else []
        for i, user in enumerate(users):
            messages.append({"role": "user", "content": user})
            if i < len(self.turns):
                messages.append({"role": "assistant", "content": self.turns[i][1]})
        return messages


def render_chat(tokenizer, conversation: Conversation, user_message: str) -> tuple[str, bool]:
    """The prompt text for the model's next answer, through its chat template, opened for the assistant.

    Returns (text for tokenizer(text), whether the system prompt had to go into the first user message
    because the template refused a system role). A BOS the template writes is dropped when the tokenizer
    adds one itself (common.prompts.strip_duplicate_bos), so the model never sees two.
    """
    from jinja2.exceptions import TemplateError

    def render(system_in_first_user):
        messages = conversation.messages(user_message, system_in_first_user)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        text, merged = render(False), False
    except TemplateError:
        if not conversation.system:
            raise
        text, merged = render(True), True
    return strip_duplicate_bos(tokenizer, text), merged


def message_too_long(length: int, budget: int) -> LabError:
    return LabError(f"This message needs {length} tokens but only {budget} fit before the answer (the "
                    "model's context minus MAX_NEW_TOKENS): shorten it or lower MAX_NEW_TOKENS.")


def drop_oldest_turns(conversation: Conversation, n_tokens, budget: int) -> int:
    """Drop the oldest exchanges until `n_tokens()` (the prompt's length) fits `budget`; return how many.

    n_tokens: a function giving the token count of the prompt the conversation renders to now.
    Raises LabError, leaving the conversation as it was, when even the new message alone does not fit.
    """
    kept = list(conversation.turns)
    dropped = 0
    while (length := n_tokens()) > budget:
        if not conversation.turns:
            conversation.turns[:] = kept  # a message too long on its own costs the conversation nothing
            raise message_too_long(length, budget)
        conversation.turns.pop(0)
        dropped += 1
    return dropped


# ----------------------------------------------------------------------------- the KV cache kept across turns


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many ids two sequences share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def cache_layer_lengths(cache) -> list[int]:
    """The number of positions each attention layer of a transformers Cache has seen (for sliding-window
    layers: seen, not held). Differs between layers only when a forward pass was cut short (Ctrl-C)."""
    return [layer.get_seq_length() for layer in cache.layers if hasattr(layer, "get_seq_length")]


def crop_cache(cache, length: int) -> bool:
    """Cut `cache` in place to its first `length` positions; False when it cannot be (then drop it).

    A sliding-window layer that has seen more tokens than its window has forgotten the early ones and
    refuses (transformers raises ValueError); a cache whose layers still disagree afterwards is refused too.
    """
    try:
        for layer in cache.layers:  # layer by layer: a sliding-window layer that needs no cut is left alone
            if hasattr(layer, "get_seq_length") and layer.get_seq_length() > length:
                layer.crop(length)
    except ValueError:
        return False
    return set(cache_layer_lengths(cache)) == {length}


@dataclass
class KeptCache:
    """A KV cache (a transformers DynamicCache) kept between turns, and the token ids it holds, in order.

    Invariant: cache positions 0..len(ids)-1 hold the keys and values of `ids` in every layer.
    """
    config: object  # the model's (text) config, to build a fresh DynamicCache like generate() does
    cache: object = None  # DynamicCache or None
    ids: list[int] = field(default_factory=list)

    def for_prompt(self, prompt: list[int]) -> tuple[object, int]:
        """The cache to pass to generate() with the full `prompt` ids, and how many of them it already holds.

        Keeps the longest prefix the cache shares with `prompt` (at least one prompt token is left to read,
        as generate() needs), or starts a fresh cache when nothing is shared or the cut is impossible.
        """
        n = min(common_prefix_length(self.ids, prompt), len(prompt) - 1)
        if self.cache is None or n == 0 or not crop_cache(self.cache, n):
            self.cache, n = DynamicCache(config=self.config), 0
        self.ids = list(prompt[:n])
        return self.cache, n

    def keep(self, ids: list[int]):
        """After generate() (finished or cut short): `ids` = prompt + generated ids, as far as they are known.

        The cache holds every id except the last generated one (sampled, never read back); after Ctrl-C its
        layers may disagree by one forward pass. Cut back to what every layer holds, or drop it.
        """
        n = min(cache_layer_lengths(self.cache) or [0])
        if n > len(ids) or n == 0 or not crop_cache(self.cache, n):
            return self.drop()
        self.ids = list(ids[:n])

    def drop(self):
        self.cache, self.ids = None, []


# ----------------------------------------------------------------------------- streaming generation


class ReplyStreamer(TextStreamer):
    """A transformers TextStreamer that writes to `out`, keeps what it wrote, and never shows stop tokens.

    TextStreamer prints whole words as they form; this subclass drops the end-of-turn ids before decoding
    (whether or not the tokenizer marks them special) and records the text in `self.printed`.
    """

    def __init__(self, tokenizer, stop_ids: list[int], out):
        super().__init__(tokenizer, skip_prompt=True, **DECODE)
        self.stop_ids = set(stop_ids)
        self.out = out
        self.printed = ""
        self.new_ids: list[int] = []  # every generated id so far, stop ids included (what Ctrl-C leaves)
        self.first_token_at: float | None = None  # time.perf_counter() when the first answer token came

    def put(self, value):
        if self.next_tokens_are_prompt:  # the prompt comes first; TextStreamer skips it
            return super().put(value)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.new_ids += value.reshape(-1).tolist()
        kept = [t for t in value.reshape(-1).tolist() if t not in self.stop_ids]
        if kept:
            super().put(torch.tensor(kept))

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.printed += text
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


@dataclass
class Reply:
    """One generated answer."""
    text: str  # the answer as kept in the conversation (no end-of-turn token)
    printed: str  # what the streamer wrote (must equal `text`)
    prompt_ids: torch.Tensor  # [1, prompt_len], what the model read
    new_ids: list[int]  # every generated id, the final end-of-turn id included when there was one
    ended_turn: bool  # True: stopped at an end-of-turn id; False: stopped at MAX_NEW_TOKENS (or Ctrl-C)
    seconds: float  # wall time of generate(), prefill included
    first_token_seconds: float | None  # from calling generate() to the first answer token (None: none came)
    n_cached: int = 0  # prompt tokens the kept KV cache already held (not read again)
    interrupted: bool = False  # True: Ctrl-C stopped the answer; `text` is what came before

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.seconds if self.seconds > 0 else math.inf


def sampling_kwargs(temperature: float, top_p: float) -> dict:
    """generate() settings: greedy when temperature is 0, else sampling with temperature and top-p.

    Other sampling settings (e.g. top_k) stay the model's own generation_config defaults.
    """
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def generate_reply(model, prompt_ids: torch.Tensor, stop_ids: list[int], max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, out=None, kept: KeptCache | None = None) -> Reply:
    """Generate one answer with the HF model (KV cache on), streaming its text to `out` as it forms.

    prompt_ids: [1, prompt_len], the whole conversation. Stops at any of `stop_ids` (never shown) or after
    max_new_tokens. With `kept`, generate() gets the full ids and the kept cache and reads only the ids the
    cache lacks; afterwards `kept` holds the cache of prompt + answer. Ctrl-C (KeyboardInterrupt) stops the
    answer: the Reply has interrupted=True and the text so far, and `kept` is cut back to a consistent cache.
    """
    out = out if out is not None else sys.stdout
    streamer = ReplyStreamer(model.tokenizer, stop_ids, out)
    ids = prompt_ids.to(model.device)
    cache, n_cached = kept.for_prompt(ids[0].tolist()) if kept is not None else (None, 0)
    pad_id = getattr(model.hf_model.generation_config, "pad_token_id", None)
    interrupted = False
    start = time.perf_counter()
    generated = None
    try:
        generated = model.hf_model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
            pad_token_id=stop_ids[0] if pad_id is None else pad_id, use_cache=True, past_key_values=cache,
            streamer=streamer, **sampling_kwargs(temperature, top_p))
    except KeyboardInterrupt:  # Ctrl-C: keep what was said so far
        interrupted = True
        streamer.end()  # print the words still held back, then a newline
    seconds = time.perf_counter() - start
    # After Ctrl-C only the streamer knows what was generated (it sees every id, in order).
    new_ids = streamer.new_ids if generated is None else generated[0, ids.shape[1]:].tolist()
    if kept is not None:
        kept.keep(prompt_ids[0].tolist() + new_ids)
    ended = bool(new_ids) and new_ids[-1] in stop_ids
    text = model.tokenizer.decode([t for t in new_ids if t not in stop_ids], **DECODE)
    first = streamer.first_token_at - start if streamer.first_token_at is not None else None
    return Reply(text, streamer.printed, prompt_ids.cpu(), new_ids, ended, seconds, first, n_cached, interrupted)


# ----------------------------------------------------------------------------- the lens on an answer


def first_token_lens(model, reply: Reply) -> dict:
    """The answer's first token through the NORM lens (common.lens), at the lab's key layers.

    Returns {"token": str, "token_id": int, "rows": [{"layer", "depth", "top_token", "top_prob",
    "token_prob", "token_rank"}], "resolution": common.lens.resolution_depth over all layers,
    "check": the lens self-check}. Probabilities at temperature 1.
    """
    if not reply.new_ids:
        raise LabError("The last answer has no tokens to look at: ask something first.")
    token_id = reply.new_ids[0]
    result = lens.sweep(model, reply.prompt_ids, token_id, use_norm=True, top_k=1)[1.0]
    rows = [{"layer": layer, "depth": layer / model.n_layers, "top_token": result.top_tokens[layer][0][0],
             "top_prob": result.top_tokens[layer][0][1], "token_prob": result.target_prob[layer],
             "token_rank": result.target_rank[layer]} for layer in lens.key_layers(model.n_layers)]
    resolution = lens.resolution_depth(result.target_rank, result.target_prob, result.entropy)
    return {"token": model.tokenizer.decode([token_id]), "token_id": token_id, "rows": rows,
            "resolution": resolution, "check": result.check}


def lens_text(reading: dict) -> str:
    """first_token_lens's result as a small table for the terminal."""
    token = repr(reading["token"])
    lines = [f"NORM lens, first token of the last answer: {token}",
             f"{'layer':>5} {'depth':>6}  {'top-1 token':<18} {'p(top-1)':>9} {'p(' + token + ')':>12} {'rank':>6}"]
    for row in reading["rows"]:
        lines.append(f"{row['layer']:>5} {row['depth']:>6.0%}  {repr(row['top_token'])[:18]:<18} "
                     f"{row['top_prob']:>9.6f} {row['token_prob']:>12.6f} {row['token_rank']:>6}")
    layer = reading["resolution"]["first_top1_layer"]
    lines.append(f"{token} is top-1 from layer {layer} on ({reading['resolution']['first_top1_depth']:.0%} deep)."
                 if layer is not None else f"{token} is not top-1 at the last layer (it was sampled).")
    check = reading["check"]
    lines.append(f"self-check: {check['name']}: {'PASS' if check['passed'] else 'FAIL'} "
                 f"(max |difference| {check['max_abs_diff']:.2g}, tolerance {check['tolerance']:.2g})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a chat session


class ChatSession:
    """A conversation with one model: answers stream to `out`, one-line notes go to `notes`.

    `history` records every answer and /lens reading, for the run's results.json and report.md.
    keep_cache=False re-reads the whole conversation every turn (what the chat did before; the bench's baseline).
    """

    def __init__(self, model, system: str = "", temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 256, out=None, notes=None, keep_cache: bool = True):
        if max_new_tokens >= model.context_length:
            raise LabError(f"MAX_NEW_TOKENS={max_new_tokens} leaves no room for the conversation in "
                           f"{model.name}'s context of {model.context_length} tokens: lower it.")
        self.model = model
        self.out = out if out is not None else sys.stdout
        self.notes = notes if notes is not None else sys.stderr
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.conversation = Conversation(system)
        self.uses_template = model.has_chat_template
        self.stop_ids = end_of_turn_ids(model.tokenizer, model.hf_model.generation_config)
        self.last: Reply | None = None
        self.history: list[dict] = []
        self._told = set()  # one-time notes already given
        # A base model has no memory between messages, so nothing to keep; a generation config that picks
        # its own cache type (generate() refuses a cache passed beside it) re-reads the conversation too.
        own_cache = getattr(model.hf_model.generation_config, "cache_implementation", None) not in (None, "hybrid")
        self.kept = (KeptCache(model.hf_model.config.get_text_config(decoder=True))
                     if keep_cache and self.uses_template and not own_cache else None)

    @property
    def stop_tokens(self) -> list[str]:
        return [self.model.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids]

    def note(self, text: str, once: str | None = None):
        """A one-line note for the user; with `once`, only the first time that key comes up."""
        if once is not None:
            if once in self._told:
                return
            self._told.add(once)
        print(text, file=self.notes, flush=True)

    def start_notes(self):
        """What the user should know before the first message (said once)."""
        if not self.uses_template:
            self.note(f"Note: {self.model.name} has no chat template (a base model): each message is continued "
                      "as plain text, with no memory of earlier ones; the system prompt does not apply.",
                      once="base")

    # ---- answering

    def prompt_ids(self, message: str) -> torch.Tensor:
        """[1, prompt_len] ids for the answer to `message`, dropping the oldest turns when they do not fit."""
        budget = self.model.context_length - self.max_new_tokens
        if not self.uses_template:  # plain continuation: the message alone
            length = len(self.model.tokenizer(message).input_ids)
            if length > budget:
                raise message_too_long(length, budget)
            return encode(self.model, message)
        merged = False

        def n_tokens():
            nonlocal merged
            text, merged = render_chat(self.model.tokenizer, self.conversation, message)
            return len(self.model.tokenizer(text).input_ids)

        dropped = drop_oldest_turns(self.conversation, n_tokens, budget)
        if dropped:
            self.note(f"(The conversation outgrew the model's context of {self.model.context_length} tokens: "
                      f"dropped the oldest {dropped} exchange{'s' if dropped > 1 else ''}.)")
        if merged:
            self.note("Note: this chat template has no system role, so the system prompt goes in front of the "
                      "first user message.", once="merged")
        text, _ = render_chat(self.model.tokenizer, self.conversation, message)
        return encode(self.model, text)

    def ask(self, message: str) -> Reply:
        """Answer one user message: stream the answer to `out` and keep the exchange in the conversation.

        Ctrl-C during the answer stops it; what was said so far is kept (in the conversation too, so the
        model knows what it said) and marked interrupted.
        """
        if not message.strip():
            raise LabError("The message is empty: type some text.")
        ids = self.prompt_ids(message)
        reply = generate_reply(self.model, ids, self.stop_ids, self.max_new_tokens, self.temperature, self.top_p,
                               self.out, self.kept)
        if reply.interrupted:
            self.note("(Ctrl-C: answer stopped; what it said so far is kept. Ctrl-C again or /quit leaves.)")
        elif not reply.text.strip():
            self.note("(The model ended its turn without saying anything.)")
        elif not reply.ended_turn:
            self.note(f"(Stopped at MAX_NEW_TOKENS={self.max_new_tokens}.)")
        if self.uses_template and (reply.text.strip() or not reply.interrupted):
            self.conversation.turns.append((message, reply.text))
        if reply.new_ids:
            self.last = reply
        self._record(message, reply)
        return reply

    def _record(self, message: str, reply: Reply):
        """Add an answer to `history` (results.json)."""
        shown_stop_texts = sum(reply.printed.count(t) for t in self.stop_tokens if t)
        self.history.append({"kind": "answer", "user": message, "answer": reply.text,
                             "printed_equals_answer": reply.printed == reply.text,
                             "end_of_turn_texts_printed": shown_stop_texts,
                             "temperature": self.temperature, "top_p": self.top_p,
                             "system": self.conversation.system, "n_prompt_tokens": int(reply.prompt_ids.shape[1]),
                             "n_cached_prompt_tokens": reply.n_cached,
                             "n_new_tokens": len(reply.new_ids), "new_ids": reply.new_ids,
                             "ended_turn": reply.ended_turn, "interrupted": reply.interrupted,
                             "seconds": reply.seconds, "first_token_seconds": reply.first_token_seconds,
                             "tokens_per_s": reply.tokens_per_s})

    # ---- commands

    def command(self, line: str):
        """Run one /command; return the text to show, or QUIT."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/quit", "/exit", "/bye"):
            return QUIT
        if name == "/help":
            return HELP
        if name == "/reset":
            self.conversation.turns.clear()
            self.last = None
            if self.kept is not None:
                self.kept.drop()  # free its memory now (the next prompt would not share it anyway)
            self.history.append({"kind": "reset"})
            return "New conversation."
        if name == "/temp":
            return self._set_temperature(arg)
        if name == "/system":
            return self._set_system(arg)
        if name == "/lens":
            if self.last is None:
                return "No answer yet: ask something first, then /lens."
            reading = first_token_lens(self.model, self.last)
            self.history.append({"kind": "lens", "after_answer": self._answers(), **reading})
            return lens_text(reading)
        return f"Unknown command {name}: type /help for the list."

    def _answers(self) -> int:
        return sum(1 for h in self.history if h["kind"] == "answer")

    def _set_temperature(self, arg: str) -> str:
        if not arg:
            return f"Temperature is {self.temperature:g}" + (" (greedy)." if self.temperature == 0 else ".")
        try:
            value = float(arg)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value >= 0):
            return f"'/temp {arg}' is not a temperature: use a number >= 0, e.g. /temp 0.7 (0 = greedy)."
        self.temperature = value
        return f"Temperature set to {value:g}" + (" (greedy)." if value == 0 else ".")

    def _set_system(self, arg: str) -> str:
        if not self.uses_template:
            return "This base model has no chat template, so a system prompt does not apply."
        if not arg:
            return f"System prompt: {self.conversation.system!r}" if self.conversation.system else \
                "No system prompt is set (the chat template may use its own default)."
        self.conversation.system = arg
        return "System prompt set; it applies from the next answer."


# ----------------------------------------------------------------------------- the run's record


def session_checks(session: ChatSession) -> list[dict]:
    """The run's invariants: what was printed equals the kept answers, no end-of-turn text was shown,
    and every /lens reading passed the NORM-lens self-check. In common.report.check_lines' shape."""
    answers = [h for h in session.history if h["kind"] == "answer"]
    mismatched = sum(1 for h in answers if not h["printed_equals_answer"])
    shown_stop = sum(h["end_of_turn_texts_printed"] for h in answers)
    checks = [
        {"name": "streamed text == the answer kept in the conversation (difference: answers that differ)",
         "max_abs_diff": mismatched, "tolerance": 0, "passed": mismatched == 0},
        {"name": "no end-of-turn token text in the printed answers (difference: times one was printed)",
         "max_abs_diff": shown_stop, "tolerance": 0, "passed": shown_stop == 0},
    ]
    checks += [h["check"] for h in session.history if h["kind"] == "lens"]
    return checks


def transcript_markdown(session: ChatSession) -> str:
    """The conversation and /lens readings as markdown, for report.md."""
    from .report import markdown_table, md_escape  # matplotlib comes with report: imported only when saving
    lines = []
    for h in session.history:
        if h["kind"] == "reset":
            lines += ["---", "*(/reset: new conversation)*", ""]
        elif h["kind"] == "answer":
            how = "Ctrl-C" if h["interrupted"] else "end of turn" if h["ended_turn"] else "MAX_NEW_TOKENS"
            first = "" if h["first_token_seconds"] is None else f", first token after {h['first_token_seconds']:.2f} s"
            lines += [f"**you:** {h['user']}", "",
                      f"**model** (temperature {h['temperature']:g}; {h['n_prompt_tokens']} prompt tokens, "
                      f"{h['n_cached_prompt_tokens']} of them from the kept cache; {h['n_new_tokens']} new, "
                      f"stopped at {how}{first}, {h['tokens_per_s']:.1f} tokens/s):", "",
                      "```text", h["answer"], "```", ""]
        elif h["kind"] == "lens":
            rows = [[r["layer"], f"{r['depth']:.0%}", md_escape(r["top_token"]), r["top_prob"], r["token_prob"],
                     r["token_rank"]] for r in h["rows"]]
            lines += [f"/lens after answer {h['after_answer']}: first token {md_escape(h['token'])}, NORM lens", "",
                      markdown_table(["layer", "depth", "top-1", "p(top-1)", f"p({md_escape(h['token'])})", "rank"],
                                     rows), "",
                      f"Top-1 from layer {h['resolution']['first_top1_layer']} on (None: not top-1 at the end).", ""]
    return "\n".join(lines)
