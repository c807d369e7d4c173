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
  - Several prompts run in one forward pass, right-padded with an attention mask; each prompt's own
    [seq, seq] block is read. A batch changes only float32 rounding (other matrix shapes): measured up to
    5e-6 in a pattern of SmolLM2 or the tiny Gemma-2 against the prompt run alone, padded or not.

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
from dataclasses import dataclass

import torch

from . import hooks, stats
from .checks import check, tolerance
from .errors import LabError
from .facts import facts_in_turns, load_fact_set, subject_span
from .progress import bar
from .prompts import Prompt, Target, encode, target_token, token_strings

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


@dataclass(frozen=True)
class Band:
    """The blocks of one model that a run studies, and the facts about its heads that the tables need."""
    layers: list[int]  # the blocks whose depth (i + 1) / n_layers lies in the depth range
    n_layers: int
    n_heads: int
    n_kv_heads: int
    local_windows: dict[int, int]  # {block: window} of the whole model's sliding-window blocks

    @classmethod
    def of(cls, model, depth_range) -> "Band":
        """The band of a loaded model (common.models.LoadedModel); LabError when depth_range holds no block."""
        return cls(band_layers(model.n_layers, depth_range), model.n_layers, model.n_heads, model.n_kv_heads,
                   sliding_window_layers(model.text_config))

    @property
    def kv_head_of_head(self) -> list[int]:
        """[n_heads]: the key/value head each query head reads."""
        return [kv_head_of(h, self.n_heads, self.n_kv_heads) for h in range(self.n_heads)]

    def depth(self, block: int) -> float:
        """Depth of the residual stream block `block` writes: (block + 1) / n_layers."""
        return (block + 1) / self.n_layers


# ----------------------------------------------------------------------------- grouped-query attention


def kv_head_of(head: int, n_heads: int, n_kv_heads: int) -> int:
    """The key/value head that query head `head` reads (HF's repeat_kv layout)."""
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    return head // (n_heads // n_kv_heads)


# ----------------------------------------------------------------------------- prompts from the fact set


def fact_prompt(fact: dict) -> Prompt:
    """A fact of the lab's fact set (common.facts) as a prompt: its first completion, verbatim, with its subject
    as a hand label in the form written there ("Gold" at a sentence start), its relation and counterfactual."""
    text = fact["completions"][0]
    start, end = subject_span(text, fact["subject"])  # common.facts.check_facts made sure it is there
    return Prompt(text, fact["target"], fact_id=fact["id"], format="completion",
                  extra={"subject": text[start:end], "relation": fact["relation"],
                         "counterfactual": fact["counterfactual"]})


def fact_set_prompts(facts_file, n: int, skip_ids=frozenset()) -> list[Prompt]:
    """Up to `n` facts of `facts_file` (001's fact set) as prompts (`fact_prompt`), relations taking turns
    (the first fact of every relation, then the second, ...), so any n spreads over every relation.

    Facts whose id is in `skip_ids` are passed over (a run's own prompts may hold them already). n = 0 gives
    []; a negative or non-whole n is a LabError.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise LabError(f"FACTS must be a whole number of facts, 0 or more, not {n!r}.")
    if n == 0:
        return []
    kept = [fact for fact in load_fact_set(facts_file) if fact["id"] not in skip_ids]
    return [fact_prompt(fact) for fact in facts_in_turns(kept, n)]


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


@dataclass
class LabelledPrompt:
    """One prompt tokenized as the model sees it, each token typed, and its subject entity."""
    prompt: Prompt
    ids: torch.Tensor  # [seq] token ids, exactly tokenizer(prompt.text)
    tokens: list[str]  # [seq] readable text of each token
    token_types: list[str]  # [seq] one of TOKEN_TYPES
    bucket_index: torch.Tensor  # [seq] index into BUCKETS: where each position's attention mass is counted
    subject_positions: list[int]  # the subject's positions whose mass is counted (see counted_positions)
    label_source: str  # "hand" (the prompts file named the subject or types) or "rule"
    target: Target  # the answer's first token


def label(model, prompt: Prompt, include_bos: bool) -> LabelledPrompt:
    """Tokenize `prompt` for `model` (common.models.LoadedModel) and type its tokens: hand labels from the
    prompts file ("subject", "types" in prompt.extra) where given, else the module's rule."""
    ids = encode(model, prompt.text)[0]
    target = target_token(model.tokenizer, prompt.text, prompt.target)
    text, offsets = token_offsets(model.tokenizer, prompt.text, ids.tolist())
    hand = {key: prompt.extra[key] for key in ("types", "subject") if key in prompt.extra}
    special_ids = set(model.tokenizer.all_special_ids)
    types, subject = label_prompt(text, offsets, [int(i) in special_ids for i in ids], hand)
    return LabelledPrompt(prompt, ids, token_strings(model.tokenizer, ids), types, bucket_index(types, include_bos),
                          counted_positions(subject, include_bos), "hand" if hand else "rule", target)


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


@dataclass
class FinalPositionAttention:
    """Where one prompt's final position (the one that predicts the answer) looks, per block and head.

    pattern: [blocks, heads, seq, seq], the whole patterns; by_bucket: [blocks, heads, len(BUCKETS)], the
    final row's mass on each bucket (sums to 1 per head); the others [blocks, heads]: its mass on the
    subject's positions and on three landmarks shown beside the types (position 0, the token before the final
    one, which previous-token heads read, and the final token itself).
    """
    pattern: torch.Tensor
    by_bucket: torch.Tensor
    subject: torch.Tensor
    sink: torch.Tensor
    previous: torch.Tensor
    itself: torch.Tensor

    @classmethod
    def of(cls, pattern: torch.Tensor, buckets: torch.Tensor, subject_positions: list[int]):
        """From patterns [blocks, heads, seq, seq], bucket index [seq] and the subject's counted positions."""
        final_rows = pattern[:, :, -1, :]  # [blocks, heads, seq]
        previous = final_rows[..., -2] if final_rows.shape[-1] > 1 else torch.zeros_like(final_rows[..., -1])
        return cls(pattern, mass_by_bucket(final_rows, buckets), mass_on(final_rows, subject_positions),
                   final_rows[..., 0], previous, final_rows[..., -1])

    @property
    def final_rows(self) -> torch.Tensor:
        """[blocks, heads, seq]: the final position's attention over the tokens."""
        return self.pattern[:, :, -1, :]


# ----------------------------------------------------------------------------- patterns


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indexes in batches of at most batch_size, shortest prompts first (so a batch pads little).

    lengths: [prompts] token counts. E.g. lengths [5, 9, 4, 5], batch_size 2 -> [[2, 0], [3, 1]].
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def pad_right(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[seq_i] id tensors -> (input_ids [batch, max_seq], attention_mask [batch, max_seq], 1 on real tokens).

    Right padding keeps each prompt at positions 0..seq_i - 1, as when it runs alone, and under the causal
    mask no real position attends to a pad: row i's [seq_i, seq_i] block of a pattern is its own pattern.
    """
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.zeros(len(sequences), longest, dtype=torch.long)  # pad id 0: masked, so any id does
    attention_mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def run_in_batches(forward, sequences: list[torch.Tensor], batch_size: int, device, description: str) -> list:
    """forward(input_ids [batch, seq], attention_mask [batch, seq], both on `device`) -> one output per row, run
    on right-padded batches (batches_by_length, pad_right) of `sequences` ([seq_i] ids each); returns the
    outputs in the order of `sequences`."""
    outputs = [None] * len(sequences)
    with bar(description, total=len(sequences), unit="prompt") as progress_bar:
        for batch in batches_by_length([len(ids) for ids in sequences], batch_size):
            input_ids, attention_mask = pad_right([sequences[i] for i in batch])
            for index, output in zip(batch, forward(input_ids.to(device), attention_mask.to(device))):
                outputs[index] = output
            progress_bar.update(len(batch))
    return outputs


@torch.no_grad()
def bridge_patterns(bridge, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    blocks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention patterns of `blocks` from the bridge cache (hook_pattern), and the logits at the last token.

    input_ids, attention_mask: [batch, seq], right-padded (pad_right). Returns per row (patterns
    [len(blocks), heads, seq_i, seq_i], logits at its last real position [vocab]), float32 on the cpu.
    Only the band's hooks are cached.
    """
    names = [hooks.block_site("pattern", block) for block in blocks]
    logits, cache = bridge.run_with_cache(input_ids, attention_mask=attention_mask,
                                          names_filter=lambda name: name in names)
    patterns = torch.stack([cache[name] for name in names], dim=1)  # [batch, blocks, heads, seq, seq]
    lengths = attention_mask.sum(-1).tolist()
    return [(patterns[row, :, :, :n, :n].float().cpu(), logits[row, n - 1].float().cpu())
            for row, n in enumerate(lengths)]


@torch.no_grad()
def hf_patterns(hf_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, blocks: list[int]) -> list:
    """The same patterns from Hugging Face's eager attention (`output_attentions=True`), the reference.

    Must run before the bridge is booted: booting wraps HF's attention modules, which then return no weights.
    input_ids, attention_mask: [batch, seq], right-padded. Returns per row [len(blocks), heads, seq_i, seq_i]
    float32 on the cpu.
    """
    attentions = hf_model(input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    if not attentions:
        raise RuntimeError("HF returned no attention weights: call hf_patterns before booting the bridge")
    patterns = torch.stack([attentions[i] for i in blocks], dim=1)  # [batch, blocks, heads, seq, seq]
    return [patterns[row, :, :, :n, :n].float().cpu() for row, n in enumerate(attention_mask.sum(-1).tolist())]


def most_padded_prompt_alone(bridge, sequences: list[torch.Tensor], batch_size: int, blocks: list[int], device):
    """(index, its patterns [blocks, heads, seq, seq] from a forward of its own) of the prompt that was padded
    most in its batch, to compare with its batched patterns; None when every forward held one prompt."""
    lengths = [len(ids) for ids in sequences]
    padding = [(max(lengths[j] for j in batch) - lengths[i], -i) for batch in batches_by_length(lengths, batch_size)
               if len(batch) > 1 for i in batch]
    if not padding:
        return None
    index = -max(padding)[1]  # the most padding; the first such prompt on a tie
    input_ids = sequences[index][None].to(device)  # [1, seq]: no padding
    [(alone, _)] = bridge_patterns(bridge, input_ids, torch.ones_like(input_ids), blocks)
    return index, alone


def pattern_checks(patterns: list[torch.Tensor], references: list[torch.Tensor], masses: list[torch.Tensor],
                   dtype, alone: tuple[int, torch.Tensor] | None = None) -> list[dict]:
    """The run's invariants, as common.report.check_lines reads them.

    patterns, references: per prompt [blocks, heads, seq, seq] (bridge, HF eager, run in the same batches);
    masses: per prompt [blocks, heads, len(BUCKETS)]; alone: (index, that prompt's patterns from a forward of
    its own), checked against patterns[index] when given. Half precision: common.checks' rule (scale 1, the
    patterns are probabilities). float32: 1e-5, and 1e-4 against the prompt run alone, where a batch's other
    matrix shapes change the rounding (measured up to 5e-6 on SmolLM2 and the tiny Gemma-2; a padding
    fault moves the patterns by far more).
    """
    def worst(values):
        return max(values) if values else math.nan

    rows = [("every attention row sums to 1", worst([(p.sum(-1) - 1).abs().max().item() for p in patterns]), 1e-5),
            ("no attention on later positions (causal)",
             worst([p.triu(diagonal=1).abs().max().item() for p in patterns]), 1e-5),
            ("masses by type sum to 1 per head", worst([(m.sum(-1) - 1).abs().max().item() for m in masses]), 1e-5),
            ("bridge hook_pattern == HF eager output_attentions",
             worst([(p - r).abs().max().item() for p, r in zip(patterns, references)]), 1e-5)]
    if alone is not None:
        index, pattern = alone
        rows.append(("patterns of the most padded prompt in its batch == the prompt run alone",
                     (patterns[index] - pattern).abs().max().item(), 1e-4))
    return [check(name, diff, tolerance(dtype, 1.0, float32_tolerance)) for name, diff, float32_tolerance in rows]


# ----------------------------------------------------------------------------- ranking


@dataclass(frozen=True)
class RankedHead:
    """One head's attention on the subject entity over the prompts that have one (see rank_heads)."""
    layer: int
    head: int
    kv_head: int
    mean: float
    std: float
    min: float
    top_rate: float
    subject_mass: dict  # common.stats.interval of its subject mass over those prompts: {"value", "ci95", "n", ...}
    in_top_k: dict  # common.stats.proportion: the share of those prompts where it is among the top k, with interval

    def as_record(self) -> dict:
        """The head as results.json's "head_ranking" holds it (003 reads layer, head, mean, top_rate)."""
        return {"head": self.head, "mean": self.mean, "std": self.std, "min": self.min, "top_rate": self.top_rate,
                "layer": self.layer, "kv_head": self.kv_head, "subject_mass": self.subject_mass,
                "in_top_k": self.in_top_k}


def rank_heads(subject_mass: torch.Tensor, has_subject: torch.Tensor, top_k: int, band: Band,
               seed: int = 0) -> list[RankedHead]:
    """Rank the band's heads by their mean attention mass on the subject entity, over the prompts that have one.

    subject_mass: [prompts, blocks, heads]; has_subject: [prompts] bool. Returns every head, best first (ties
    in block-then-head order): mean, std (population), min over those prompts, and top_rate = the share of
    them on which the head is among that prompt's `top_k` heads (consistency); the mean and the share also as
    seeded bootstrap intervals over the prompts (common.stats). Empty when no prompt has a subject.
    """
    mass = subject_mass[has_subject]  # [p, blocks, heads]
    if mass.shape[0] == 0:
        return []
    p, _, n_heads = mass.shape
    flat = mass.reshape(p, -1)  # [p, blocks * heads]
    k = min(top_k, flat.shape[1])
    in_top = torch.zeros_like(flat, dtype=torch.bool)
    in_top.scatter_(1, flat.topk(k, dim=1).indices, True)
    mean, std, low = flat.mean(0), flat.std(0, unbiased=False), flat.min(0).values
    rate = in_top.float().mean(0)
    order = torch.argsort(mean, descending=True, stable=True)
    kv_of = band.kv_head_of_head
    return [RankedHead(band.layers[int(i) // n_heads], int(i) % n_heads, kv_of[int(i) % n_heads], float(mean[i]),
                       float(std[i]), float(low[i]), float(rate[i]), stats.interval(flat[:, i].tolist(), seed=seed),
                       stats.proportion(in_top[:, i].tolist(), seed=seed)) for i in order]
