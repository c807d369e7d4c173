"""Attention patterns: which layers form the depth band, what each token is, where each head looks.

Used by 002_attention_patterns. Conventions:
  - A pattern is softmax(q k^T) per query head: [heads, query, key], each row a distribution over the key
    positions (causal: zero on later positions). Read from the bridge hook `blocks.{i}.attn.hook_pattern`.
  - Block i (`blocks.{i}`) writes lens layer i + 1 (see common/lens.py), so its depth is (i + 1) / n_layers:
    the depth of the residual stream it produces, the same axis as 001's logit lens.
  - Grouped-query attention: n_heads query heads share n_kv_heads key/value heads; query head h reads
    key/value head h // (n_heads // n_kv_heads), as HF's `repeat_kv` lays them out.
  - Position 0 is the attention sink: models park attention there whether it holds a BOS or (SmolLM2,
    which adds none) the first word. Its mass is always reported apart ("sink"); INCLUDE_BOS decides
    whether it also counts under its own token type.

Token types (the labelling rule, applied per word; a word split into several tokens gives each the same type):
  special     - a special token (BOS, chat markers) or one the tokenizer added with no text behind it;
  punctuation - a token with no letter or digit (punctuation, spaces, newlines);
  function    - a word in STOP_WORDS (articles, prepositions, pronouns, auxiliaries, clitics like 's);
  entity      - any other word that starts with a capital letter ("France", "Romeo", "United");
  relation    - every other word: the content words that carry the relation ("capital", "written", "hot").
A prompt may override the rule by hand (see `label_prompt`): {"types": {word: type}, "subject": "text"}.
The subject entity is the hand-given "subject" text, else every entity token except the final position.
"""
from __future__ import annotations

import math
import re

import torch

from . import hooks
from .checks import check, tolerance
from .errors import LabError

TOKEN_TYPES = ("special", "entity", "relation", "function", "punctuation")
SINK = "sink"
BUCKETS = (SINK,) + TOKEN_TYPES  # where attention mass is counted; sums to 1 over these per head

STOP_WORDS = frozenset("""
a an the this that these those some any each every no
of in on at to for from by with about as into onto over under between through during before after
above below up down out off near than like via per upon within without against among toward towards
and or but nor so yet if then because while although though whether
is was are were be been being am do does did has have had will would shall should can could may might must
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
who whom whose which what where when why how there here
not also very just only too all both
s t d m ll re ve
isn aren wasn weren doesn didn hasn haven hadn wouldn couldn shouldn
""".split())  # the last two lines: the pieces of 's, 'd, 'm, 'll, 're, 've and n't words split at the apostrophe

_WORD = re.compile(r"\w+")


# ----------------------------------------------------------------------------- which layers


def check_depth_range(depth_range):
    """Raise LabError unless depth_range is two numbers (low, high) with 0 <= low <= high <= 1."""
    ok = (isinstance(depth_range, (list, tuple)) and len(depth_range) == 2
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in depth_range))
    if not ok or not 0 <= depth_range[0] <= depth_range[1] <= 1:
        raise LabError(f"DEPTH_RANGE must be two fractions of depth (low, high) with 0 <= low <= high <= 1, "
                       f"like (0.4, 0.85), not {depth_range!r}.")


def band_layers(n_layers: int, depth_range) -> list[int]:
    """The blocks whose output depth (i + 1) / n_layers lies in depth_range = (low, high), inclusive.

    Raises LabError when depth_range is malformed (see check_depth_range) or holds no block.
    """
    check_depth_range(depth_range)
    low, high = depth_range
    # Rounding guards exact edges against float error (0.85 * 20 = 17.000000000000004).
    blocks = [i for i in range(n_layers) if round(low * n_layers, 9) <= i + 1 <= round(high * n_layers, 9)]
    if not blocks:
        raise LabError(f"DEPTH_RANGE {tuple(depth_range)} holds no layer of this {n_layers}-layer model "
                       f"(layer depths are multiples of 1/{n_layers}): widen it.")
    return blocks


def block_depth(block: int, n_layers: int) -> float:
    """Depth of the residual stream block `block` writes: (block + 1) / n_layers."""
    return (block + 1) / n_layers


def sliding_window_layers(config) -> dict[int, int]:
    """{block: window} for the blocks with local (sliding-window) attention, read from the HF config.

    Gemma-2/3 and Qwen3 list them in `layer_types`; Mistral's `sliding_window` applies to every block.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return {}
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return {i: int(window) for i, kind in enumerate(layer_types) if kind == "sliding_attention"}
    return {i: int(window) for i in range(int(config.num_hidden_layers))}


# ----------------------------------------------------------------------------- grouped-query attention


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head that query head `head` reads (HF's repeat_kv layout)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    return head // (n_heads // n_kv_heads)


def expand_kv_heads(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Give every query head its key/value head: kv [batch, n_kv_heads, seq, d] -> [batch, n_heads, seq, d]."""
    index = torch.tensor([kv_head_of(h, n_heads, kv.shape[1]) for h in range(n_heads)], device=kv.device)
    return kv.index_select(1, index)


# ----------------------------------------------------------------------------- token types


def word_type(word: str, overrides: dict | None = None) -> str:
    """The type of one word (a run of letters/digits) by the module's rule, unless `overrides` names it."""
    overrides = overrides or {}
    if word in overrides:
        return overrides[word]
    if word.lower() in overrides:
        return overrides[word.lower()]
    if word.lower() in STOP_WORDS:
        return "function"
    return "entity" if word[0].isupper() else "relation"


def label_tokens(text: str, offsets: list[tuple[int, int]], special: list[bool],
                 overrides: dict | None = None) -> list[str]:
    """A type from TOKEN_TYPES for every token of `text`.

    offsets: [seq] (start, end) character spans of the tokens in `text` (HF's offset_mapping);
    special: [seq] True for special tokens. A token takes the type of the word holding its first letter or
    digit, so every piece of a split word ("Rom" + "eo") has the word's type.
    """
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    types = []
    for (start, end), is_special in zip(offsets, special):
        if is_special or start >= end:
            types.append("special")
            continue
        first = _WORD.search(text, start, end)
        if first is None:
            types.append("punctuation")
            continue
        word = next(w for s, e, w in words if s <= first.start() < e)
        types.append(word_type(word, overrides))
    return types


def subject_positions(text: str, offsets: list[tuple[int, int]], types: list[str],
                      subject: str | None = None) -> list[int]:
    """Positions of the subject entity: the tokens overlapping the first occurrence of `subject` in `text`,
    or, with no subject given, every entity token except the last position (the one that predicts)."""
    if subject is None:
        return [i for i, kind in enumerate(types[:-1]) if kind == "entity"]
    begin = text.find(subject)
    if begin < 0:
        raise LabError(f"The subject {subject!r} does not occur in the prompt {text!r}: copy it exactly.")
    stop = begin + len(subject)
    return [i for i, (s, e) in enumerate(offsets) if s < stop and e > begin and types[i] != "special"]


def label_prompt(text: str, offsets: list[tuple[int, int]], special: list[bool],
                 hand: dict | None = None) -> tuple[list[str], list[int]]:
    """(type per token, subject positions) of one prompt; `hand` = optional {"types": {...}, "subject": str}.

    Tokens of a hand-given subject are typed entity, so the subject always lies within the entity type.
    """
    hand = hand or {}
    types = label_tokens(text, offsets, special, hand.get("types"))
    subject = subject_positions(text, offsets, types, hand.get("subject"))
    for i in subject:
        types[i] = "entity"
    return types, subject


def offsets_from_decoding(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """For tokenizers without offset mappings: the decoded text and each token's span in it."""
    text, offsets = "", []
    for k in range(len(ids)):
        longer = tokenizer.decode(ids[: k + 1])
        offsets.append((len(text), len(longer)) if longer.startswith(text) else (len(longer), len(longer)))
        text = longer
    return text, offsets


def token_offsets(tokenizer, text: str, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text the offsets refer to, [(start, end)] per token) for the ids `tokenizer(text)` gave."""
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        if list(encoded.input_ids) == list(ids):
            return text, [tuple(span) for span in encoded.offset_mapping]
    return offsets_from_decoding(tokenizer, list(ids))


def check_hand_labels(labels: dict, prompt: str, where: str):
    """Validate the optional hand labels of a PROMPTS_FILE entry ({"types": {...}, "subject": "..."})."""
    types = labels.get("types")
    if types is not None:
        if not isinstance(types, dict) or not all(isinstance(k, str) and v in TOKEN_TYPES for k, v in types.items()):
            raise LabError(f"{where}: \"types\" must map words to one of {', '.join(TOKEN_TYPES)}, not {types!r}.")
        words = {w for w in _WORD.findall(prompt)} | {w.lower() for w in _WORD.findall(prompt)}
        missing = [w for w in types if w not in words]
        if missing:
            raise LabError(f"{where}: the hand-labelled word(s) {missing} are not words of the prompt {prompt!r}.")
    subject = labels.get("subject")
    if subject is not None:
        if not isinstance(subject, str) or not subject.strip():
            raise LabError(f"{where}: \"subject\" must be the subject's text as it appears in the prompt.")
        if subject not in prompt:
            raise LabError(f"{where}: the subject {subject!r} does not occur in the prompt {prompt!r}.")


# ----------------------------------------------------------------------------- masses


def bucket_index(types: list[str], include_bos: bool) -> torch.Tensor:
    """[seq] index into BUCKETS per position: position 0 is the sink unless include_bos counts it by type."""
    index = [BUCKETS.index(kind) for kind in types]
    if not include_bos:
        index[0] = BUCKETS.index(SINK)
    return torch.tensor(index)


def mass_by_bucket(final_rows: torch.Tensor, buckets: torch.Tensor) -> torch.Tensor:
    """Attention mass on each bucket: final_rows [..., seq] (rows sum to 1), buckets [seq] -> [..., len(BUCKETS)].

    Sums to 1 over the last axis whenever the rows do.
    """
    one_hot = torch.nn.functional.one_hot(buckets, len(BUCKETS)).to(final_rows.dtype)  # [seq, buckets]
    return final_rows @ one_hot


def counted_positions(positions: list[int], include_bos: bool) -> list[int]:
    """Drop position 0 from a set of positions when its mass goes to the sink (include_bos False)."""
    return [i for i in positions if include_bos or i != 0]


def mass_on(final_rows: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Attention mass on a set of positions: final_rows [..., seq] -> [...] (0 for an empty set)."""
    if not positions:
        return final_rows.new_zeros(final_rows.shape[:-1])
    return final_rows[..., positions].sum(-1)


def landmark_masses(pattern: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attention from the final position on three landmark positions, shown beside the types.

    pattern: [..., seq, seq] -> {"sink": position 0, "previous": the token before the final one (what
    previous-token heads read), "self": the final token itself}, each [...].
    """
    final = pattern[..., -1, :]
    previous = final[..., -2] if final.shape[-1] > 1 else torch.zeros_like(final[..., -1])
    return {"sink": final[..., 0], "previous": previous, "self": final[..., -1]}


# ----------------------------------------------------------------------------- patterns


@torch.no_grad()
def bridge_patterns(bridge, input_ids: torch.Tensor, blocks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention patterns of `blocks` from the bridge cache, and the logits at the last position.

    input_ids: [1, seq] (already on the model's device). Returns (patterns [len(blocks), heads, seq, seq]
    float32 on the cpu, last-position logits [vocab] float32). Only the band's hooks are cached.
    """
    names = [hooks.block_site("pattern", block) for block in blocks]
    logits, cache = bridge.run_with_cache(input_ids, names_filter=lambda name: name in names)
    patterns = torch.stack([cache[name][0] for name in names]).float().cpu()
    return patterns, logits[0, -1].float().cpu()


@torch.no_grad()
def hf_patterns(hf_model, input_ids: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """The same patterns from Hugging Face's eager attention (`output_attentions=True`), the reference.

    Must run before the bridge is booted: booting wraps HF's attention modules, which then return no weights.
    Returns [len(blocks), heads, seq, seq] float32 on the cpu.
    """
    attentions = hf_model(input_ids, output_attentions=True).attentions
    if not attentions:
        raise RuntimeError("HF returned no attention weights: call hf_patterns before booting the bridge")
    return torch.stack([attentions[i][0] for i in blocks]).float().cpu()


def pattern_checks(patterns: list[torch.Tensor], references: list[torch.Tensor], masses: list[torch.Tensor],
                   dtype) -> list[dict]:
    """The run's invariants, as common.report.check_lines reads them.

    patterns, references: per prompt [blocks, heads, seq, seq] (bridge, HF eager); masses: per prompt
    [blocks, heads, len(BUCKETS)]. Tolerance 1e-5 in float32, common.checks' rule in half precision.
    """
    allowed = tolerance(dtype, 1.0, 1e-5)  # patterns are probabilities: scale 1

    def worst(values):
        return max(values) if values else math.nan

    row_sum = worst([(p.sum(-1) - 1).abs().max().item() for p in patterns])
    future = worst([p.triu(diagonal=1).abs().max().item() for p in patterns])
    mass_sum = worst([(m.sum(-1) - 1).abs().max().item() for m in masses])
    vs_hf = worst([(p - r).abs().max().item() for p, r in zip(patterns, references)])
    rows = [("every attention row sums to 1", row_sum), ("no attention on later positions (causal)", future),
            ("masses by type sum to 1 per head", mass_sum),
            ("bridge hook_pattern == HF eager output_attentions", vs_hf)]
    return [check(name, diff, allowed) for name, diff in rows]


# ----------------------------------------------------------------------------- ranking


def rank_heads(subject_mass: torch.Tensor, has_subject: torch.Tensor, top_k: int) -> list[dict]:
    """Rank heads by their mean attention mass on the subject entity, over the prompts that have one.

    subject_mass: [prompts, blocks, heads]; has_subject: [prompts] bool. Returns one dict per head, best
    first, with indexes into the blocks/heads axes: mean, std (population), min over those prompts, and
    top_rate = the share of them on which the head is among that prompt's `top_k` heads (consistency).
    Empty when no prompt has a subject.
    """
    mass = subject_mass[has_subject]  # [p, blocks, heads]
    if mass.shape[0] == 0:
        return []
    p, n_blocks, n_heads = mass.shape
    flat = mass.reshape(p, -1)  # [p, blocks * heads]
    k = min(top_k, flat.shape[1])
    in_top = torch.zeros_like(flat, dtype=torch.bool)
    in_top.scatter_(1, flat.topk(k, dim=1).indices, True)
    mean, std, low = flat.mean(0), flat.std(0, unbiased=False), flat.min(0).values
    rate = in_top.float().mean(0)
    order = torch.argsort(mean, descending=True, stable=True)
    return [{"block_index": int(i) // n_heads, "head": int(i) % n_heads, "mean": float(mean[i]),
             "std": float(std[i]), "min": float(low[i]), "top_rate": float(rate[i])} for i in order]
