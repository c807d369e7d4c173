"""Tiny random models of the lab's four architectures, built from configs and saved like real checkpoints.

They borrow the embedded SmolLM2 tokenizer (vocab 49152), so every architecture path of the lab runs
offline with real text. Widths are small and a few layers deep: each builds, saves and loads in a second.
"""
from pathlib import Path

import torch

VOCAB = 49152
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny_configs() -> dict:
    """name -> transformers config; Qwen3, Mistral and Gemma-2 need an explicit head_dim."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen3Config
    return {
        "llama": LlamaConfig(**COMMON, tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
        "qwen3": Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"]),
        "mistral": MistralConfig(**COMMON, head_dim=16, sliding_window=None, tie_word_embeddings=False,
                                 architectures=["MistralForCausalLM"]),
        # A large initializer_range puts Gemma-2's logits near its soft-cap, so a test can tell capped
        # from uncapped.
        "gemma2": Gemma2Config(**COMMON, head_dim=16, initializer_range=1.0, final_logit_softcapping=30.0,
                               attn_logit_softcapping=50.0, query_pre_attn_scalar=16, sliding_window=64,
                               architectures=["Gemma2ForCausalLM"]),
    }


def build_tiny_model(name: str, folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """Save a random model of architecture `name` with the tokenizer from `tokenizer_folder` into `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs()[name], dtype=torch.float32)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder
