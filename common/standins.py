"""Random-weight stand-ins of the models the lab is for, at their real shapes.

The four seed models' config.json files are in `model-configs/` (Qwen3-8B, Meta-Llama-3-8B,
Mistral-7B-v0.1, Gemma-2-9B). `build_standin` makes a random model from one of them, optionally with
fewer layers but the full width, heads and vocabulary, and saves it as a folder that `MODEL` can name,
so the lab's real loading code runs on it. Deterministic (seeded); built on the meta device and filled
in its own dtype, so a 16-bit stand-in never passes through float32.

    .venv/bin/python -m common.standins meta-llama-3-8b /tmp/llama3-2layers --layers=2 --dtype=bfloat16
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "model-configs"
SEED_MODELS = {"qwen3-8b": "Qwen/Qwen3-8B", "meta-llama-3-8b": "meta-llama/Meta-Llama-3-8B",
               "mistral-7b-v0.1": "mistralai/Mistral-7B-v0.1", "gemma-2-9b": "google/gemma-2-9b"}


def seed_config(name: str, n_layers: int | None = None):
    """The transformers config of a seed model (a name in SEED_MODELS or a config.json path), optionally
    cut to `n_layers` layers (per-layer lists such as Gemma-2's layer_types are cut to match)."""
    from transformers import AutoConfig
    path = CONFIGS / f"{name}.json" if name in SEED_MODELS else Path(name)
    values = json.loads(path.read_text())
    if n_layers is not None:
        values["num_hidden_layers"] = n_layers
        for key in ("layer_types",):
            if isinstance(values.get(key), list):
                values[key] = values[key][:n_layers]
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def build_standin(name: str, folder: Path, dtype: str = "bfloat16", n_layers: int | None = None,
                  seed: int = 0, tokenizer_folder: Path | None = None) -> Path:
    """Save a random-weight model of seed model `name` (in `dtype`, `n_layers` layers or all) into `folder`.

    The weights are drawn by transformers' own initialisation (normal with the config's initializer_range;
    norms as the architecture starts them) in `dtype`, seeded. `tokenizer_folder` (e.g. the embedded
    SmolLM2's) is copied in so the folder runs as a MODEL; its ids fit any of the seed vocabularies.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = seed_config(name, n_layers)
    config.architectures = config.architectures or [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.to_empty(device="cpu")
    model.init_weights()  # fills every parameter in its own dtype, from the seeded generator
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size="500MB")
    if tokenizer_folder is not None:
        AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder


def weight_bytes(name: str, n_layers: int | None = None, bytes_per_parameter: int = 2) -> int:
    """Bytes of a seed model's weights (16-bit by default), counted on the meta device."""
    from .models import parameter_count
    return parameter_count(seed_config(name, n_layers)) * bytes_per_parameter


def _llama_cpp_permute(weights, n_head: int):
    """llama.cpp's q/k row order for Llama-family GGUFs (transformers' loader undoes it)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(folder: Path, path: Path, quant: str = "Q8_0") -> Path:
    """Write a saved Llama-architecture model folder as a GGUF (2-D weights quantized as `quant`, norms F32),
    one tensor at a time, the way llama.cpp lays it out (q/k rows permuted). For tests and the bench."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter, quantize
    from safetensors import safe_open
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(folder)
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("lab stand-in")
    for add, value in [("block_count", config.num_hidden_layers), ("context_length", config.max_position_embeddings),
                       ("embedding_length", config.hidden_size), ("feed_forward_length", config.intermediate_size),
                       ("head_count", config.num_attention_heads), ("head_count_kv", config.num_key_value_heads),
                       ("rope_freq_base", float(getattr(config, "rope_parameters", {}).get("rope_theta", 10000.0))),
                       ("layer_norm_rms_eps", config.rms_norm_eps), ("vocab_size", config.vocab_size)]:
        getattr(writer, f"add_{add}")(value)
    files = sorted(Path(folder).glob("*.safetensors"))
    qtype = getattr(GGMLQuantizationType, quant)
    tensors = []  # (gguf name, file, hf name, permute heads)
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if name == "model.embed_tokens.weight":
                    gname = "token_embd.weight"
                elif name == "lm_head.weight":
                    gname = "output.weight"
                elif name == "model.norm.weight":
                    gname = "output_norm.weight"
                else:
                    _, _, layer, *rest = name.split(".")
                    gname = f"blk.{layer}.{GGUF_NAMES['.'.join(rest[:-1])]}.weight"
                heads = (config.num_attention_heads if "attn_q" in gname else
                         config.num_key_value_heads if "attn_k" in gname else None)
                tensors.append((gname, file, name, heads))
    for gname, file, name, heads in tensors:
        with safe_open(file, "pt") as f:
            array = f.get_tensor(name).to(torch.float32).numpy()
        if heads:
            array = _llama_cpp_permute(array, heads)
        if array.ndim == 2:
            writer.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    args = dict(a[2:].split("=", 1) for a in sys.argv[3:])
    build_standin(sys.argv[1], Path(sys.argv[2]), args.get("dtype", "bfloat16"),
                  int(args["layers"]) if "layers" in args else None, int(args.get("seed", 0)))
