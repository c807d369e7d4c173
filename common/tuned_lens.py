"""The tuned lens (Belrose et al. 2023): one learned affine translator per layer, then the NORM lens.

The logit lens reads every layer as if it already spoke the final layer's basis. The tuned lens first
translates layer l's residual with an affine map trained for that layer, then applies the model's final
norm and unembedding (common.lens.unembed):

    tuned_l(h) = unembed(h + W_l h + b_l, use_norm=True)      for layers l = 0 .. n_layers - 1
    tuned_n(h) = unembed(h, use_norm=True)                    the last layer has no translator

W_l and b_l start at zero, so an untrained tuned lens IS the NORM lens (the reference's residual
parametrization: weight decay pulls toward the identity, not toward zero). Training minimizes
KL(final distribution || lens distribution), averaged over token positions of a text corpus and summed
over layers, as in the reference's train loop (loss "kl", token shift 0).

Why our own ~300 lines and not the `tuned-lens` package (EleutherAI, 0.2.0): its wheel pulls wandb,
datasets, torchdata (whose DataLoader2, imported by its train loop, is gone from current torchdata),
plotly and simple-parsing, and its Unembed finds the final norm by architecture name. The lab needs
only the translators, the loss and a small loop on top of common.lens, which already handles every
architecture (Gemma-2 soft-cap, Gemma-3) and is tested.

Corpus (offline), half and half, held-out documents disjoint from the training ones:
  - prose: Python's own reference documentation (`pydoc_data.topics`, the text behind `help()`), which
    ships with every CPython: human-written English, present on any machine that runs the lab;
  - the model's own text: continuations it samples (temperature 1) from STARTS, short English openings on
    varied topics. The KL objective asks the lens to match the model on contexts the model visits, and
    its own samples are exactly those; the prose keeps human text in the mix.
  Every HELDOUT_EVERY-th prose topic and every HELDOUT_EVERY-th start is held out (never trained on).

Optimizer: Adam with a linear warm-up and decay (the reference offers SGD with Nesterov momentum and
Adam; with the few hundred steps a CPU affords, Adam converged faster in our trials) and gradient-norm
clipping at 1, as the reference. Translators train in float32 whatever the model's dtype (residuals are
cast up; the final norm and unembedding run in the model's dtype), so the same code runs on MPS/CUDA
in float16/bfloat16.

Trained lenses are cached in cache_dir()/tuned_lens, keyed by the model (folder or id, a hash of its
config, its dtype), the corpus and the training settings. A damaged entry is retrained with one line
of notice. `python -m common.tuned_lens MODEL ...` (`make tuned-lens`) trains or reads them.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import LabError
from .checks import check, tolerance
from .lens import (LensTrajectory, kl_divergence, metric_checks, metrics_by_temperature, residual_stream,
                   trajectories, unembed)
from .progress import bar, progress

CACHE_FORMAT = 1  # bump when a cached lens must be retrained
HELDOUT_EVERY = 5  # every 5th prose topic and every 5th start is held out
MIN_DOC_TOKENS = 16  # shorter prose topics are skipped
STARTS = [
    "The old lighthouse keeper", "In the spring of 1923,", "Scientists have discovered that",
    "The recipe calls for", "When the train finally arrived", "Our quarterly results show",
    "The history of the Roman Empire", "My grandmother used to say", "The rules of chess are",
    "Photosynthesis is the process", "Dear Sir or Madam,", "The football match ended",
    "To install the software, first", "The museum's newest exhibit", "Once upon a time, in a village",
    "The stock market fell sharply", "A healthy breakfast should include", "The volcano erupted",
    "In mathematics, a prime number", "The band's second album", "Climate change affects",
    "The detective looked at the", "Learning a new language", "The city council voted",
    "Our hiking trip began at dawn", "The human heart has four", "Yesterday I went to the market",
    "The first computers were", "Water boils at", "The novel tells the story of",
    "During the Middle Ages,", "The best way to learn programming", "She opened the letter and",
    "The planet Mars", "According to the report,", "The garden was full of",
    "Vaccines work by", "The company announced", "He had never seen the ocean",
    "The French Revolution began",
]


@dataclass(frozen=True)
class TunedLensSettings:
    """How a tuned lens is trained; every field is part of the cache key."""
    train_tokens: int | None = None  # None = from mac_budget (so each model trains in about the same time)
    heldout_tokens: int | None = None  # None = a quarter of train_tokens
    seq_len: int = 128  # tokens per document
    epochs: int = 1
    batch_tokens: int = 64  # token positions per optimizer step
    lr: float = 3e-3
    weight_decay: float = 1e-3  # pulls W_l, b_l toward zero, i.e. the translator toward the identity
    seed: int = 0
    mac_budget: float = 1.05e13  # training multiply-adds when train_tokens is None (SmolLM2: 4096 tokens)
    max_train_tokens: int = 16384


def choose_token_counts(model, settings: TunedLensSettings) -> tuple[int, int]:
    """(train, held-out) token counts. Training costs about 3 n_layers * vocab * d_model multiply-adds per
    token and epoch (forward and backward through the unembedding); a GPU gets 50 times the CPU budget."""
    train = settings.train_tokens
    if train is None:
        per_token = 3 * model.n_layers * model.text_config.vocab_size * model.d_model * settings.epochs
        budget = settings.mac_budget * (1 if model.device == "cpu" else 50)
        train = min(settings.max_train_tokens, int(budget / per_token))
        train = max(4 * settings.seq_len, train // settings.seq_len * settings.seq_len)
    heldout = settings.heldout_tokens if settings.heldout_tokens is not None else max(settings.seq_len, train // 4)
    if train < settings.seq_len or heldout < 1:
        raise LabError(f"The tuned lens needs at least {settings.seq_len} training tokens and one held-out token "
                       f"(got {train} and {heldout}): raise train_tokens / heldout_tokens.")
    return train, heldout


# ----------------------------------------------------------------------------- the lens


class TunedLens(torch.nn.Module):
    """n_layers affine translators (float32, zero = identity), for layers 0 .. n_layers - 1."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.translators = torch.nn.ModuleList(torch.nn.Linear(d_model, d_model) for _ in range(n_layers))
        for translator in self.translators:
            torch.nn.init.zeros_(translator.weight)
            torch.nn.init.zeros_(translator.bias)

    def translate(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """h: [..., d_model] from `layer` (0 .. n_layers) -> [..., d_model] float32; the last layer passes as is."""
        h = h.to(self.translators[0].weight.device, torch.float32)
        if layer == len(self.translators):
            return h
        return h + self.translators[layer](h)

    def logits(self, model, h: torch.Tensor, layer: int, grad: bool = False) -> torch.Tensor:
        """The tuned lens of `layer`: [..., d_model] -> logits [..., vocab] float32 (final norm, unembedding)."""
        with torch.set_grad_enabled(grad):
            return unembed(model, self.translate(h, layer), use_norm=True, grad=grad)

    def sweep_logits(self, model, resid: torch.Tensor) -> torch.Tensor:
        """resid: [n_layers + 1, d_model] (common.lens.residual_stream) -> logits [n_layers + 1, vocab]."""
        return torch.stack([self.logits(model, resid[layer], layer) for layer in range(resid.shape[0])])


def kl_to_final(final_logits: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) in nats, clamped at 0 (rounding). final_logits, lens_logits: [tokens, vocab] -> [tokens]."""
    return kl_divergence(final_logits, lens_logits).clamp_min(0.0)


def tuned_sweep(model, lens: TunedLens, input_ids: torch.Tensor, target_id: int, top_k: int = 5) -> LensTrajectory:
    """Like common.lens.sweep (temperature 1) with the tuned lens. input_ids: [1, seq].

    Its checks: the last layer (no translator) == the model's logits, then common.lens.metric_checks.
    """
    resid, model_logits = residual_stream(model, input_ids)  # [n_layers + 1, d_model], [vocab]
    with torch.no_grad():
        logits = lens.sweep_logits(model, resid)  # [n_layers + 1, vocab]
    diff = (logits[-1] - model_logits.float()).abs().max().item()
    metrics = metrics_by_temperature(logits, target_id, top_k, (1.0,))
    checks = [check("tuned lens at the last layer == model logits", diff, tolerance(model.dtype, model_logits, 1e-4))]
    checks += metric_checks("tuned lens", logits, model_logits, target_id, metrics, model.dtype)
    return trajectories(model, metrics, checks)[1.0]


# ----------------------------------------------------------------------------- the corpus


def split_heldout(items: list) -> tuple[list, list]:
    """(train, held-out): every HELDOUT_EVERY-th item is held out, so the two never share a document."""
    return ([x for i, x in enumerate(items) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1],
            [x for i, x in enumerate(items) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1])


def prose_texts(seed: int) -> list[str]:
    """Python's reference documentation topics (pydoc_data ships with CPython), in a seeded order."""
    from pydoc_data.topics import topics
    texts = [topics[name] for name in sorted(topics)]
    random.Random(seed).shuffle(texts)
    return texts


def take_tokens(docs: list[torch.Tensor], n_tokens: int) -> list[torch.Tensor]:
    """The first documents (each [seq]) holding n_tokens in all, the last one cut to fit."""
    out, have = [], 0
    for doc in docs:
        if have >= n_tokens:
            break
        out.append(doc[: n_tokens - have])
        have += len(out[-1])
    return out


def prose_documents(model, texts: list[str], n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Tokenized as the model sees text (the tokenizer's defaults), each cut to seq_len tokens."""
    docs, have = [], 0
    for text in texts:
        if have >= n_tokens:
            break
        ids = torch.tensor(model.tokenizer(text)["input_ids"][:seq_len])
        if len(ids) >= MIN_DOC_TOKENS:
            docs.append(ids)
            have += len(ids)
    return take_tokens(docs, n_tokens)


@torch.no_grad()
def generated_documents(model, starts: list[str], n_tokens: int, seq_len: int, seed: int,
                        batch: int = 16) -> list[torch.Tensor]:
    """The model's own continuations (sampled at temperature 1) of `starts`, in turn, up to n_tokens in all.

    Each document is [<= seq_len] ids: the start, then the sample, cut after the first end-of-text token.
    Sampled `batch` starts at a time (left-padded). The KV cache only while the TransformerLens bridge is
    not booted: after it boots, cached generation goes wrong (DESIGN.md); without it, right but slower.
    """
    torch.manual_seed(seed)
    eos = model.tokenizer.eos_token_id
    docs, have, i = [], 0, 0
    with bar(f"{model.name}: sampling text for the tuned lens", total=n_tokens, unit="tok") as progress_bar:
        while have < n_tokens:
            size = min(batch, math.ceil(2 * (n_tokens - have) / seq_len))  # no more than about needed
            encoded = [model.tokenizer(starts[(i + j) % len(starts)])["input_ids"] for j in range(size)]
            i += size
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[eos] * (width - len(e)) + e for e in encoded], device=model.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
            out = model.hf_model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                          top_p=1.0, use_cache=model._bridge is None,
                                          max_new_tokens=seq_len - width, pad_token_id=eos).cpu()
            for row, e in zip(out, encoded):
                new = row[width:]
                ends = (new == eos).nonzero()
                doc = torch.cat([torch.tensor(e), new[: int(ends[0]) + 1 if len(ends) else len(new)]])
                docs.append(doc[: n_tokens - have])
                have += len(docs[-1])
                progress_bar.update(len(docs[-1]))
                if have >= n_tokens:
                    break
    return docs


def build_corpus(model, settings: TunedLensSettings, n_train: int, n_heldout: int) -> dict:
    """{"train": [docs], "heldout": [docs], "trained_on": str}: half prose, half the model's own text."""
    prose_train, prose_heldout = split_heldout(prose_texts(settings.seed))
    starts_train, starts_heldout = split_heldout(STARTS)
    corpus, n_prose = {}, {}
    for split, n, prose, starts in (("train", n_train, prose_train, starts_train),
                                    ("heldout", n_heldout, prose_heldout, starts_heldout)):
        docs = prose_documents(model, prose, n // 2, settings.seq_len)
        n_prose[split] = sum(len(d) for d in docs)
        corpus[split] = docs + generated_documents(model, starts, n - n_prose[split], settings.seq_len,
                                                   settings.seed + len(split))
    corpus["trained_on"] = (
        f"{n_train} tokens: {n_prose['train']} of Python's reference documentation (pydoc_data.topics, Python "
        f"{sys.version_info.major}.{sys.version_info.minor}) and {n_train - n_prose['train']} the model sampled (T = 1) "
        f"from {len(starts_train)} English starts; held out: {n_heldout} tokens from other topics and "
        f"{len(starts_heldout)} other starts")
    return corpus


# ----------------------------------------------------------------------------- residuals, training, held-out KL


def check_memory(model, n_tokens: int):
    """Stop before collecting residuals that would not fit: n_tokens x (n_layers + 1) x d_model, model dtype."""
    from .models import available_memory_bytes
    need = n_tokens * (model.n_layers + 1) * model.d_model * torch.finfo(model.dtype).bits // 8
    have = available_memory_bytes("cpu")
    if need > have // 2:
        raise LabError(f"Training the tuned lens on {n_tokens} tokens keeps {need / 2**30:.1f} GB of residuals, "
                       f"more than half the {have / 2**30:.1f} GB free: lower train_tokens.")


def collect_residuals(model, docs: list[torch.Tensor], label: str) -> torch.Tensor:
    """Every position's residual stream: docs (each [seq]) -> [tokens, n_layers + 1, d_model], model dtype, CPU."""
    chunks = []
    for ids in progress(docs, f"{model.name}: residuals of the {label} text", unit="doc"):
        resid, _ = residual_stream(model, ids[None], all_positions=True)  # [n_layers + 1, seq, d_model]
        chunks.append(resid.transpose(0, 1).cpu())
    return torch.cat(chunks)


class _FrozenModel:
    """Within it the model's weights need no gradient (only the translators train); restored after."""

    def __init__(self, model):
        self.params = list(model.hf_model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def train_translators(model, lens: TunedLens, resid: torch.Tensor, settings: TunedLensSettings) -> list[float]:
    """Minimize the sum over layers of the mean KL(final || tuned lens). resid: [tokens, n_layers + 1, d_model].

    Returns the loss (summed over layers, nats) of every step. Layer by layer backward, as the reference,
    so only one [batch, vocab] graph is alive at a time.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    steps_per_epoch = math.ceil(len(resid) / settings.batch_tokens)
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.Adam(lens.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup + 1))))
    losses = []
    with _FrozenModel(model), bar(f"{model.name}: training the tuned lens", total=total, unit="step") as progress_bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(resid), generator=generator)
            for start in range(0, len(resid), settings.batch_tokens):
                h = resid[order[start: start + settings.batch_tokens]].to(model.device)  # [batch, n + 1, d]
                final = unembed(model, h[:, -1], use_norm=True)  # [batch, vocab]
                optimizer.zero_grad()
                loss_sum = 0.0
                for layer in range(model.n_layers):
                    loss = kl_to_final(final, lens.logits(model, h[:, layer], layer, grad=True)).mean()
                    loss.backward()
                    loss_sum += loss.item()
                torch.nn.utils.clip_grad_norm_(lens.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                losses.append(loss_sum)
                progress_bar.update(1)
                progress_bar.set_postfix(kl=f"{loss_sum / model.n_layers:.3f}", refresh=False)
    return losses


@torch.no_grad()
def heldout_kl(model, lens: TunedLens, resid: torch.Tensor, batch_tokens: int = 64) -> dict:
    """Mean KL(final || lens) per layer over resid [tokens, n_layers + 1, d_model], for the NORM and tuned lens.

    Returns {"norm": [n_layers + 1], "tuned": [n_layers + 1]} in nats (the last entry is 0 for both).
    """
    sums = {"norm": torch.zeros(model.n_layers + 1), "tuned": torch.zeros(model.n_layers + 1)}
    for start in progress(range(0, len(resid), batch_tokens), f"{model.name}: held-out KL", unit="batch"):
        h = resid[start: start + batch_tokens].to(model.device)
        final = unembed(model, h[:, -1], use_norm=True)
        for layer in range(model.n_layers + 1):
            sums["norm"][layer] += kl_to_final(final, unembed(model, h[:, layer], use_norm=True)).sum().cpu()
            sums["tuned"][layer] += kl_to_final(final, lens.logits(model, h[:, layer], layer)).sum().cpu()
    return {name: (total / len(resid)).tolist() for name, total in sums.items()}


# ----------------------------------------------------------------------------- train, cache, load


@dataclass
class TrainedLens:
    """A tuned lens with what it was trained on and how well it does on held-out text."""
    lens: TunedLens
    trained_on: str
    n_tokens: int  # training tokens
    n_heldout_tokens: int
    heldout_kl: dict  # {"norm": [n_layers + 1], "tuned": [n_layers + 1]}, nats
    seconds: float  # training time (collection, training and evaluation)
    path: Path | None = None

    def summary(self) -> dict:
        """The results.json "tuned_lens" block."""
        return {"trained_on": self.trained_on, "n_tokens": self.n_tokens, "n_heldout_tokens": self.n_heldout_tokens,
                "heldout_kl": self.heldout_kl, "train_seconds": self.seconds,
                "cache_file": str(self.path) if self.path else None}


def train_tuned_lens(model, settings: TunedLensSettings | None = None) -> TrainedLens:
    """Build the corpus, collect residuals, train the translators, measure held-out KL (no cache)."""
    settings = settings or TunedLensSettings()
    n_train, n_heldout = choose_token_counts(model, settings)
    check_memory(model, n_train + n_heldout)
    began = time.time()
    corpus = build_corpus(model, settings, n_train, n_heldout)
    train_resid = collect_residuals(model, corpus["train"], "training")
    heldout_resid = collect_residuals(model, corpus["heldout"], "held-out")
    torch.manual_seed(settings.seed)
    lens = TunedLens(model.n_layers, model.d_model).to(model.device)
    train_translators(model, lens, train_resid, settings)
    kl = heldout_kl(model, lens, heldout_resid)
    return TrainedLens(lens.eval(), corpus["trained_on"], len(train_resid), len(heldout_resid), kl,
                       time.time() - began)


def cache_key(model, settings: TunedLensSettings) -> dict:
    """What a cached lens depends on: the model (where from, its config, dtype), the corpus, the settings."""
    from pydoc_data.topics import topics
    config_text = model.config.to_json_string(use_diff=False)
    return {"format": CACHE_FORMAT, "model_folder": str(model.folder), "model_name": model.name,
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "dtype": str(model.dtype).replace("torch.", ""),
            "corpus_sha256": hashlib.sha256(json.dumps([STARTS, HELDOUT_EVERY, MIN_DOC_TOKENS,
                                                        sorted(topics.items())]).encode()).hexdigest(),
            "settings": asdict(settings)}


def cache_path(model, settings: TunedLensSettings) -> Path:
    from .models import cache_dir
    digest = hashlib.sha256(json.dumps(cache_key(model, settings), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "tuned_lens" / f"{model.slug}-{digest}.pt"


def save(trained: TrainedLens, path: Path, key: dict):
    """Write atomically (a temporary file renamed), so an interrupted save leaves no half-written entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save({"key": key, "state_dict": trained.lens.state_dict(), "trained_on": trained.trained_on,
                "n_tokens": trained.n_tokens, "n_heldout_tokens": trained.n_heldout_tokens,
                "heldout_kl": trained.heldout_kl, "seconds": trained.seconds}, temporary)
    temporary.replace(path)
    trained.path = path


def load(model, path: Path, key: dict) -> TrainedLens:
    """Read a cached lens; raises (any exception) when the file is damaged or belongs to other settings."""
    entry = torch.load(path, map_location="cpu", weights_only=True)
    if entry["key"] != key:
        raise ValueError("its key does not match this model and these settings")
    lens = TunedLens(model.n_layers, model.d_model)
    lens.load_state_dict(entry["state_dict"])  # strict: every translator, right shapes
    kl = entry["heldout_kl"]
    if sorted(kl) != ["norm", "tuned"] or any(len(v) != model.n_layers + 1 for v in kl.values()):
        raise ValueError("its held-out KL has the wrong shape")
    return TrainedLens(lens.to(model.device).eval(), entry["trained_on"], int(entry["n_tokens"]),
                       int(entry["n_heldout_tokens"]), kl, float(entry["seconds"]), path)


def load_or_train(model, settings: TunedLensSettings | None = None) -> TrainedLens:
    """The cached tuned lens of this model and settings, trained (and cached) on first use."""
    settings = settings or TunedLensSettings()
    path, key = cache_path(model, settings), cache_key(model, settings)
    if path.exists():
        try:
            return load(model, path, key)
        except Exception as exc:  # any damage (truncated, not a torch file, wrong shapes) means: train again
            print(f"Tuned-lens cache {path} is damaged ({type(exc).__name__}: {str(exc)[:80]}); retraining.",
                  file=sys.stderr, flush=True)
    trained = train_tuned_lens(model, settings)
    save(trained, path, key)
    return trained


def describe(model, trained: TrainedLens) -> str:
    """A few lines for the terminal: tokens, time, held-out KL per layer for both lenses."""
    norm, tuned = trained.heldout_kl["norm"], trained.heldout_kl["tuned"]
    better = sum(t < n for t, n in zip(tuned[1:-1], norm[1:-1]))
    lines = [f"{model.name}: tuned lens trained on {trained.trained_on} ({trained.seconds:.0f} s); cache {trained.path}",
             f"  held-out KL(final || lens), nats, layer: NORM -> tuned; tuned lower at {better} of "
             f"{model.n_layers - 1} layers 1..{model.n_layers - 1}"]
    lines += [f"  {layer:3d}: {n:8.4f} -> {t:8.4f}" for layer, (n, t) in enumerate(zip(norm, tuned))]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """`python -m common.tuned_lens [MODEL ...]`: train (or read from the cache) each model's tuned lens."""
    from .errors import install_error_handler
    from .models import EMBEDDED_MODELS, load_model, resolve_model
    install_error_handler()
    specs = argv or list(EMBEDDED_MODELS)
    for spec in specs:
        resolve_model(spec)  # every name checked before the first model loads
    for spec in specs:
        model = load_model(spec)
        trained = load_or_train(model)
        print(describe(model, trained), flush=True)
        model.free()


if __name__ == "__main__":
    main(sys.argv[1:])
