"""Tokenization identical to HF, target tokens, prompt formats and prompt files."""
import json

import pytest
import torch

from common.errors import LabError
from common.prompts import (chat_prompt, encode, load_facts, load_prompts_file, render_fact, strip_duplicate_bos,
                            target_token)

FACT = {"id": "fr", "target": "Paris", "question": "What is the capital of France?",
        "completions": ["The capital of France is", "France's capital is"]}


def test_tokens_match_hf_and_the_bridge_adds_no_bos(tiny):
    text = "The capital of France is"
    ids = encode(tiny, text)
    assert ids[0].tolist() == tiny.tokenizer(text).input_ids
    # The bridge runs exactly these tokens: same logits as the HF model on the same ids.
    with torch.no_grad():
        assert torch.allclose(tiny.bridge(ids), tiny.hf_model(ids).logits, atol=1e-4)


def test_target_token_after_a_word_and_after_a_space(embedded):
    tok = embedded.tokenizer
    after_word = target_token(tok, "The capital of France is", "Paris")
    assert after_word.token == " Paris" and after_word.n_tokens == 1
    after_space = target_token(tok, "The capital of France is ", "Paris")
    assert after_space.token == "Paris"
    multi = target_token(tok, "The word is", "antidisestablishmentarianism")
    assert multi.n_tokens > 1 and tok.decode([multi.token_id]).strip()


def test_empty_and_overlong_prompts_are_refused(tiny):
    with pytest.raises(LabError, match="empty"):
        encode(tiny, "   ")
    with pytest.raises(LabError, match="shorten it"):
        encode(tiny, "word " * (tiny.context_length + 10))
    with pytest.raises(LabError, match="empty"):
        target_token(tiny.tokenizer, "The capital of France is", " ")


def test_formats_build_the_prompts_they_claim(embedded):
    tok = embedded.tokenizer
    assert render_fact(tok, FACT, "completion").text == "The capital of France is"
    assert render_fact(tok, FACT, "completion", variant=1).text == "France's capital is"
    assert render_fact(tok, FACT, "qa").text == "Question: What is the capital of France?\nAnswer:"
    chat = render_fact(tok, FACT, "chat")
    assert chat.text.endswith("<|im_start|>assistant\nThe capital of France is")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in chat.text
    with pytest.raises(LabError):
        render_fact(tok, FACT, "haiku")


def test_chat_prompt_never_doubles_the_bos():
    class FakeTokenizer:  # a Llama-3-like tokenizer: the template writes BOS and the tokenizer adds one
        bos_token, bos_token_id, chat_template = "<s>", 1, "x"

        def __call__(self, text):
            return type("Enc", (), {"input_ids": [1, 5]})()

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>[user] " + messages[-1]["content"] + " [assistant] "

    assert strip_duplicate_bos(FakeTokenizer(), "<s>hello") == "hello"
    assert chat_prompt(FakeTokenizer(), "Hi?", "Answer:") == "[user] Hi? [assistant] Answer:"


def test_base_model_has_no_chat_format():
    class Base:
        chat_template = None

    with pytest.raises(LabError, match="no chat template"):
        chat_prompt(Base(), "Hi?")


@pytest.mark.parametrize("content, fragment", [
    ("not json", "not valid JSON"),
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ('[{"prompt": "x"}]', "string fields"),
    ('[{"prompt": "", "target": "Paris"}]', "empty prompt"),
    ('[{"prompt": "The capital is", "target": ""}]', "empty target"),
])
def test_broken_prompt_files(tmp_path, content, fragment):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(LabError, match=fragment):
        load_prompts_file(path)


def test_prompt_file_keeps_extra_fields(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "A", "target": "B", "counterfactual": "C"}]))
    [prompt] = load_prompts_file(path)
    assert (prompt.text, prompt.target, prompt.extra) == ("A", "B", {"counterfactual": "C"})
    with pytest.raises(LabError, match="does not exist"):
        load_prompts_file(tmp_path / "missing.json")


def test_lab_facts_file_is_valid():
    from pathlib import Path
    facts = load_facts(Path(__file__).parent.parent / "001_layers_and_logits" / "prompts.json")
    assert len(facts) >= 6 and all(len(f["completions"]) >= 2 for f in facts)
