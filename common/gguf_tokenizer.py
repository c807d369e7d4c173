"""Rebuild a Gemma tokenizer from a GGUF file, for the transformers version the lab pins.

Why by hand: transformers 5.9 (pinned for the KV cache, see requirements.txt) turns a Gemma GGUF
vocabulary into a Unigram model scored by the file's `scores`, which for Gemma are not log-probabilities:
the result cuts every word into single characters ("Paris" -> P a r i s) and adds no BOS. Later
transformers releases (5.24) fixed it as done here: a SentencePiece BPE whose merges are recovered from
the vocabulary in file order, two-or-more-space tokens respelled with "▁", control tokens kept whole.
"""
from __future__ import annotations

from pathlib import Path

GEMMA_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _read_tokenizer_fields(gguf_path: Path) -> dict:
    from gguf import GGUFReader
    fields = GGUFReader(str(gguf_path)).fields

    def array(key):
        field = fields[key]
        return [field.parts[i] for i in field.data]

    def scalar(key):
        field = fields.get(key)
        return None if field is None else field.parts[field.data[0]][0]

    return {"tokens": [bytes(part).decode("utf-8") for part in array("tokenizer.ggml.tokens")],
            "types": [int(part[0]) for part in array("tokenizer.ggml.token_type")],
            "ids": {name: scalar(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")},
            "add_bos": bool(scalar("tokenizer.ggml.add_bos_token") if "tokenizer.ggml.add_bos_token" in fields
                            else True)}


def gemma_tokenizer_from_gguf(gguf_path: Path, chat_template: str | None = None):
    """A transformers GemmaTokenizer equal to the model's own, built from the GGUF's vocabulary."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    data = _read_tokenizer_fields(gguf_path)
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in data["tokens"]]
    vocab = {token: index for index, token in enumerate(tokens)}
    # Gemma's merge order is the order tokens appear in the file, not their scores.
    merges = generate_merges(vocab, {token: -index for index, token in enumerate(tokens)})
    special = {name: tokens[int(index)] for name, index in data["ids"].items() if index is not None}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, bos_token=special.get("bos", "<bos>"),
                               eos_token=special.get("eos", "<eos>"), unk_token=special.get("unknown", "<unk>"),
                               pad_token=special.get("padding", "<pad>"), add_bos_token=data["add_bos"])
    control = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, data["types"]) if kind == CONTROL]
    tokenizer.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, data["types"]) if kind == USER_DEFINED])
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer
