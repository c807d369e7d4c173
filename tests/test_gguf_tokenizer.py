"""The Gemma tokenizer rebuilt from a GGUF vocabulary: BPE merges in file order, words kept whole."""
import pytest

from common.gguf_tokenizer import gemma_tokenizer_from_gguf

TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "a", "b", "c", "\u2581", "ab", "\u2581ab", "abc",
          "  ", "\u2581c"]
TYPES = [3, 3, 3, 2, 3] + [1] * (len(TOKENS) - 5)


@pytest.fixture
def tiny_gguf(tmp_path):
    import numpy as np
    from gguf import GGUFWriter
    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([-1000.0] * 5 + [-float(i) for i in range(len(TOKENS) - 5)])  # not the merge order
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_tensor("dummy", np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_words_stay_whole_and_bos_is_added(tiny_gguf):
    tokenizer = gemma_tokenizer_from_gguf(tiny_gguf, chat_template="{{ messages }}")
    ids = tokenizer("abc ab c").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "abc", "\u2581ab", "\u2581c"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "abc ab c"
    assert tokenizer.chat_template == "{{ messages }}"


def test_control_tokens_and_double_spaces(tiny_gguf):
    tokenizer = gemma_tokenizer_from_gguf(tiny_gguf)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("<start_of_turn>ab  c").input_ids)
    assert tokens == ["<bos>", "<start_of_turn>", "ab", "\u2581\u2581", "c"]
