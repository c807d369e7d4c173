"""GGUF -> a cached transformers folder, streamed: one tensor (or a block of its rows) in memory at a time.

transformers' own GGUF loading dequantizes every tensor to float32 into a whole model first (an 8B Q4 GGUF
would need ~32 GB). Here each tensor is read with the `gguf` package, dequantized a block of rows at a
time, cast to the storage dtype and written straight into safetensors shards, so the peak is the
libraries plus a few hundred MB whatever the model's size. The tensor names and the Llama/Gemma fix-ups
(q/k row permutation, Gemma's norm offset) are transformers' own (`get_gguf_hf_weights_map`,
`TENSOR_PROCESSORS`): the result equals `from_pretrained(gguf_file=...)` cast to the same dtype (tested).

The cache is keyed by the file's content (size + SHA-256 of its first and last 4 MiB), not its path, so
the same GGUF in another folder or clone is not converted again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

CONVERT_FORMAT = 1  # bump when converted folders must be rebuilt
SHARD_BYTES = 2 * 1024 ** 3  # safetensors shard size
ROWS_BYTES = 64 * 1024 ** 2  # dequantize about this many float32 bytes of rows at a time
HEAD_TAIL_BYTES = 4 * 1024 ** 2
SMALL_FOR_FLOAT32 = 1_000_000_000  # parameters: up to this, a float32 run stores float32 (the embedded models)
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def content_key(path: Path) -> str:
    """A short key for a file's content: its size and a SHA-256 of its first and last 4 MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(HEAD_TAIL_BYTES))
        f.seek(max(0, size - HEAD_TAIL_BYTES))
        digest.update(f.read(HEAD_TAIL_BYTES))
    return digest.hexdigest()[:16]


def storage_dtype_name(model_type: str, run_dtype, n_params: int, bfloat16_families) -> str:
    """How a converted model is stored: float32 only for a float32 run of a small model, else 16-bit
    (bfloat16 for the Gemma families, whose activations overflow float16; float16 otherwise)."""
    import torch
    if run_dtype == torch.float32 and n_params <= SMALL_FOR_FLOAT32:
        return "float32"
    return "bfloat16" if model_type in bfloat16_families else "float16"


def gguf_config(gguf: Path):
    """The transformers config a GGUF describes (metadata only, no tensor read)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _tensor_plan(reader, config, parsed_config: dict) -> list[dict]:
    """For each GGUF tensor that the model uses: its HF name, output shape and processor (from transformers)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                           get_gguf_hf_weights_map, read_field)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed_config)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(config)
    names = get_gguf_hf_weights_map(meta_model, processor)
    plan = []
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        # The processor's row permutation (Llama q/k), found by running it on row indices.
        result = processor.process(weights=np.arange(shape[0]), name=tensor.name, tensor_key_mapping=names,
                                   parsed_parameters={})
        if result.name not in names:
            continue  # e.g. rope_freqs: not a parameter of the HF model (transformers skips it too)
        perm = result.weights
        rows_only = len(shape) == 2 and perm.shape == (shape[0],) and np.array_equal(np.sort(perm), np.arange(shape[0]))
        plan.append({"tensor": tensor, "name": names[result.name], "shape": shape, "processor": processor,
                     "perm": None if rows_only and np.array_equal(perm, np.arange(shape[0])) else perm,
                     "rows_only": rows_only})
    return plan


def _shards(plan: list[dict], itemsize: int) -> list[list[dict]]:
    """Split the tensors, in file order, into shards of at most SHARD_BYTES (a bigger tensor gets its own)."""
    shards, size = [[]], 0
    for entry in plan:
        nbytes = itemsize * math.prod(entry["shape"])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def _header(shard: list[dict], dtype_name: str, itemsize: int) -> bytes:
    """The safetensors header for tensors written back to back in this order (padded to 8 bytes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in shard:
        end = offset + itemsize * math.prod(entry["shape"])
        header[entry["name"]] = {"dtype": _SAFETENSORS_DTYPES[dtype_name], "shape": list(entry["shape"]),
                                 "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_tensor(f, entry: dict, dtype):
    """Dequantize one tensor block by block and write it in `dtype`; whole-tensor only where a processor
    changes values (Gemma's norms, 1-D) or permutes rows (Llama q/k, a few MB)."""
    import numpy as np
    import torch
    from gguf import dequantize
    tensor, shape = entry["tensor"], entry["shape"]
    if not entry["rows_only"]:  # small tensors: exactly transformers' path (float32, processor, cast)
        weights = entry["processor"].process(weights=dequantize(tensor.data, tensor.tensor_type),
                                             name=tensor.name).weights
        out = torch.from_numpy(np.array(weights, copy=True)).to(dtype).reshape(shape)
        f.write(out.contiguous().view(torch.uint8).numpy().tobytes())
        return
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only: never written
    step = max(1, ROWS_BYTES // (4 * shape[1]))
    blocks = []
    for start in range(0, shape[0], step):
        block = torch.from_numpy(dequantize(tensor.data[start:start + step], tensor.tensor_type)).to(dtype)
        if entry["perm"] is None:
            f.write(block.contiguous().view(torch.uint8).numpy())
        else:
            blocks.append(block)
    if blocks:
        whole = torch.cat(blocks)[torch.from_numpy(entry["perm"])]
        f.write(whole.contiguous().view(torch.uint8).numpy())


def _drop_pages(reader):
    """Tell the OS this process no longer needs the GGUF pages it read (they stay in the file cache), so
    a many-GB file does not count towards this process's memory."""
    import mmap
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def write_weights(reader, plan: list[dict], folder: Path, dtype_name: str):
    """Stream every planned tensor into safetensors shards in `folder` (+ an index when there are several)."""
    import torch
    dtype = getattr(torch, dtype_name)
    itemsize = torch.finfo(dtype).bits // 8
    shards = _shards(plan, itemsize)
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file, shard in zip(files, shards):
        with open(folder / file, "wb") as f:
            f.write(_header(shard, dtype_name, itemsize))
            for entry in shard:
                _write_tensor(f, entry, dtype)
                _drop_pages(reader)
                weight_map[entry["name"]] = file
                total += itemsize * math.prod(entry["shape"])
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


def needed_disk_bytes(config, dtype_name: str, n_params: int) -> int:
    """Bytes a converted folder takes: the weights in the storage dtype plus ~50 MB for the tokenizer."""
    return n_params * {"float32": 4}.get(dtype_name, 2) + 50_000_000


def convert(gguf: Path, folder: Path, config, dtype_name: str, save_tokenizer):
    """Write a transformers folder for `gguf` into `folder`: config, generation config, weights, tokenizer.

    `save_tokenizer(tmp)` writes the tokenizer (the caller knows the Gemma fix), when the GGUF has one. Everything goes to a
    temporary sibling folder renamed at the end; any failure or Ctrl-C removes it and re-raises.
    """
    from gguf import GGUFReader
    from transformers import GenerationConfig
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        reader = GGUFReader(gguf)
        # The processors read head counts under transformers' names, as the config has them.
        write_weights(reader, _tensor_plan(reader, config, config.to_dict()), tmp, dtype_name)
        config.dtype = dtype_name
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        if "tokenizer.ggml.tokens" in reader.fields:  # a bare stand-in GGUF has no tokenizer
            save_tokenizer(tmp)
        (tmp / "lab_source.json").write_text(json.dumps({"gguf": str(gguf.resolve()), "dtype": dtype_name,
                                                         "content_key": content_key(gguf)}))
        del reader
        _move_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, folder: Path):
    """Rename the finished `tmp` to `folder`. A second run converting the same file at the same time (two
    experiments started together on first use) may have finished first: its folder is complete (folders appear
    only by this rename), so it is kept and `tmp` dropped. A folder without config.json is a leftover: replaced."""
    if folder.exists() and not (folder / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        if not (folder / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
