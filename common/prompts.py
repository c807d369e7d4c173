"""Prompts, prompt formats and target tokens.

A prompt is tokenized exactly as `tokenizer(prompt)` does with its defaults: what the model sees under
Hugging Face (TransformerLens' `to_tokens` may add a BOS that HF does not, so the lab never uses it).

Facts (the experiments' own prompts.json) are written once and rendered in each format:
  {"id": "france_capital", "target": "Paris", "question": "What is the capital of France?",
   "completions": ["The capital of France is", "France's capital city is", ...]}
  completion: the first completion, verbatim;
  qa:         "Question: <question>\nAnswer:";
  chat:       the model's chat template with the question as the user turn, then the first completion
              as the start of the assistant's answer (the answer prefix).
A PROMPTS_FILE is a JSON list of {"prompt": str, "target": str}, each prompt used verbatim.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LabError

PROMPT_FORMATS = ("completion", "qa", "chat")


@dataclass
class Prompt:
    """One prompt with the answer expected after it."""
    text: str
    target: str
    fact_id: str = ""
    format: str = "verbatim"  # completion | qa | chat | verbatim (from a PROMPTS_FILE)
    variant: int = 0  # which wording of the fact (0 = the main one, 1.. = paraphrases)
    extra: dict = field(default_factory=dict)  # anything else the file gave (counterfactuals, labels, ...)


def read_json_list(path: Path, what: str) -> list:
    if not path.is_file():
        raise LabError(f"{what} '{path}' does not exist: check the path.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LabError(f"{what} '{path}' is not valid JSON ({exc}): fix the file.") from None
    if not isinstance(data, list) or not data:
        raise LabError(f"{what} '{path}' must be a non-empty JSON list.")
    return data


def load_prompts_file(path: str | Path) -> list[Prompt]:
    """Read a PROMPTS_FILE: a JSON list of {"prompt": str, "target": str}; other keys are kept in `extra`."""
    path = Path(path).expanduser()
    prompts = []
    for i, item in enumerate(read_json_list(path, "PROMPTS_FILE")):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(
                item.get("target"), str):
            raise LabError(f"PROMPTS_FILE '{path}' entry {i} must be an object with string fields "
                           "\"prompt\" and \"target\".")
        if not item["prompt"].strip():
            raise LabError(f"PROMPTS_FILE '{path}' entry {i} has an empty prompt: write the text before the answer.")
        if not item["target"].strip():
            raise LabError(f"PROMPTS_FILE '{path}' entry {i} has an empty target: write the expected answer.")
        extra = {k: v for k, v in item.items() if k not in ("prompt", "target")}
        prompts.append(Prompt(item["prompt"], item["target"], fact_id=str(item.get("id", i)), extra=extra))
    return prompts


def load_facts(path: str | Path) -> list[dict]:
    """Read an experiment's facts file (see the module docstring) and check its shape."""
    path = Path(path)
    facts = read_json_list(path, "Facts file")
    for i, fact in enumerate(facts):
        ok = (isinstance(fact, dict) and isinstance(fact.get("target"), str) and fact["target"].strip()
              and isinstance(fact.get("question"), str) and isinstance(fact.get("completions"), list)
              and fact["completions"] and all(isinstance(c, str) and c.strip() for c in fact["completions"]))
        if not ok:
            raise LabError(f"Facts file '{path}' entry {i} needs \"target\", \"question\" and a non-empty list "
                           "of \"completions\".")
    return facts


def chat_prompt(tokenizer, user_message: str, answer_prefix: str = "", system: str | None = None) -> str:
    """The model's chat template around one user turn, opened for the assistant, plus an answer prefix.

    Raises LabError when the tokenizer has no chat template (a base model).
    Text for `tokenizer(text)`: a BOS the template writes is removed when the tokenizer adds one itself,
    so the model never sees two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise LabError("This model has no chat template (it is a base model): use the completion or qa format.")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user_message}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return strip_duplicate_bos(tokenizer, text) + answer_prefix


def strip_duplicate_bos(tokenizer, text: str) -> str:
    """Remove a leading BOS string from `text` when tokenizer(text) would add a BOS token itself."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        probe = tokenizer("x").input_ids
        if probe and probe[0] == tokenizer.bos_token_id:
            return text[len(bos):]
    return text


def render_fact(tokenizer, fact: dict, prompt_format: str, variant: int = 0) -> Prompt:
    """One fact as a Prompt in one format (see the module docstring); `variant` picks the wording."""
    completion = fact["completions"][variant]
    fact_id = fact.get("id", fact["target"])
    extra = {k: v for k, v in fact.items() if k not in ("id", "target", "question", "completions")}
    if prompt_format == "completion":
        text = completion
    elif prompt_format == "qa":
        text = f"Question: {fact['question']}\nAnswer:"
    elif prompt_format == "chat":
        text = chat_prompt(tokenizer, fact["question"], answer_prefix=completion)
    else:
        raise LabError(f"Unknown prompt format '{prompt_format}': use one of {', '.join(PROMPT_FORMATS)}.")
    return Prompt(text, fact["target"], fact_id=fact_id, format=prompt_format, variant=variant, extra=extra)


# ----------------------------------------------------------------------------- tokens


def encode(model, text: str):
    """Token ids exactly as tokenizer(text) gives them: LongTensor [1, seq]. Checks empty and too long."""
    if not text or not text.strip():
        raise LabError("A prompt is empty: write some text before the answer.")
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise LabError(f"The prompt {text!r} tokenizes to nothing: write some text.")
    if ids.shape[1] > model.context_length:
        raise LabError(f"A prompt is {ids.shape[1]} tokens but {model.name} reads at most "
                       f"{model.context_length}: shorten it.")
    return ids


def token_strings(tokenizer, ids) -> list[str]:
    """Readable text of each token id (e.g. ' Paris'), for tables and labels."""
    return [tokenizer.decode([int(i)]) for i in ids]


@dataclass(frozen=True)
class Target:
    token_id: int
    token: str  # the decoded first token, e.g. " Paris"
    n_tokens: int  # how many tokens the whole answer takes (1 = a single token)


def target_token(tokenizer, prompt: str, target: str) -> Target:
    """The first token of the answer as the model would produce it after `prompt`.

    The answer is " " + target when the prompt does not end in whitespace, else target. The token is read
    from tokenizer(prompt + answer) after the prompt's own tokens (so SentencePiece's word-start marks
    come out as in real text); when the prompt's tokens merge with the answer's, the answer is
    tokenized alone instead.
    """
    if not target or not target.strip():
        raise LabError(f"The target for prompt {prompt!r} is empty: write the expected answer.")
    answer = target if prompt[-1:].isspace() else " " + target
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(prompt + answer).input_ids
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        answer_ids = full_ids[len(prompt_ids):]
    else:
        answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    if not answer_ids:
        raise LabError(f"The target {target!r} is not a token of this model's vocabulary: use a word or symbol.")
    return Target(int(answer_ids[0]), tokenizer.decode([answer_ids[0]]), len(answer_ids))


def load_prompt_list(prompts_file, facts_file: Path, tokenizer=None) -> list[Prompt]:
    """The prompts of a run: PROMPTS_FILE verbatim (its optional hand labels checked), else a facts file's
    facts in completion format (first wording). Used by 002 and 003."""
    from .attention import check_hand_labels  # labels are about token types, which attention.py defines
    if not prompts_file:
        return [render_fact(tokenizer, fact, "completion") for fact in load_facts(facts_file)]
    prompts = load_prompts_file(prompts_file)
    for i, prompt in enumerate(prompts):
        labels = {key: prompt.extra[key] for key in ("subject", "types") if key in prompt.extra}
        check_hand_labels(labels, prompt.text, f"PROMPTS_FILE entry {i}")
    return prompts
