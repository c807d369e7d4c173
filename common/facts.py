"""The lab's fact set: facts grouped by relation, their checks, and clean/corrupt pairs built from them.

A fact (001_layers_and_logits/prompts.json; common/prompts.py renders it in each prompt format):
  {"id": "france_capital", "relation": "capital", "subject": "France", "target": "Paris",
   "counterfactual": "London", "question": "What is the capital of France?",
   "completions": ["The capital of France is", "France's capital city is"]}
  relation:       what kind of fact (capital, chemical_symbol, author, ...); statistics are broken down by it;
  subject:        the words the fact is about, as written in the question and in every completion (at a
                  sentence start its first letter may be upper case: "gold" in "Gold's chemical symbol is");
  counterfactual: a wrong but plausible answer, another answer of the same relation ("London" for Paris).
The first completion of every fact of a relation follows one template ("The capital of {subject} is"), so
two facts of a relation make a clean/corrupt pair that differs only in the subject (`counterfactual_pairs`).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from .errors import LabError

FACT_TEXT_FIELDS = ("id", "relation", "subject", "target", "counterfactual", "question")


def load_fact_set(path: str | Path) -> list[dict]:
    """The facts of `path` (common.prompts.load_facts' shape check), then `check_facts`' checks."""
    from .prompts import load_facts
    facts = load_facts(path)
    check_facts(facts, f"Facts file '{path}'")
    return facts


def subject_span(text: str, subject: str) -> tuple[int, int] | None:
    """(start, end) of `subject` in `text` as a whole word (or with its first letter upper case), else None."""
    for form in dict.fromkeys((subject, subject[:1].upper() + subject[1:])):
        found = re.search(rf"(?<!\w){re.escape(form)}(?!\w)", text)
        if found:
            return found.span()
    return None


def check_facts(facts: list[dict], where: str = "Facts file"):
    """Refuse a fact set the relation-aware code cannot use: one LabError line naming the first problem.

    Every fact has non-empty text fields FACT_TEXT_FIELDS, a unique id, a counterfactual that is not its
    target, and its subject in the question and in every completion.
    """
    seen = set()
    for i, fact in enumerate(facts):
        missing = [k for k in FACT_TEXT_FIELDS if not isinstance(fact.get(k), str) or not fact[k].strip()]
        if missing:
            raise LabError(f"{where} entry {i} needs non-empty text for {', '.join(missing)}.")
        label = f"{where} fact '{fact['id']}'"
        if fact["id"] in seen:
            raise LabError(f"{label} appears twice: give every fact its own id.")
        seen.add(fact["id"])
        if fact["counterfactual"].strip() == fact["target"].strip():
            raise LabError(f"{label} has its target as counterfactual: name a wrong answer of the same relation.")
        for text in [fact["question"]] + list(fact["completions"]):
            if subject_span(text, fact["subject"]) is None:
                raise LabError(f"{label}: the subject {fact['subject']!r} is not a word of {text!r}.")


def relations(facts: list[dict]) -> dict[str, list[dict]]:
    """{relation: [facts]} in the order the relations first appear."""
    groups: dict[str, list[dict]] = {}
    for fact in facts:
        groups.setdefault(fact["relation"], []).append(fact)
    return groups


def facts_in_turns(facts: list[dict], n: int | None) -> list[dict]:
    """The first `n` facts with relations taking turns (the first fact of every relation, then the second, ...),
    so any n spreads over every relation; n = None gives every fact, in the file's order."""
    if n is None:
        return list(facts)
    groups = list(relations(facts).values())
    in_turns = [group[i] for i in range(max(map(len, groups), default=0)) for group in groups if i < len(group)]
    return in_turns[:n]


# ----------------------------------------------------------------------------- clean/corrupt pairs


def _encoded_completion(tokenizer, fact: dict) -> dict:
    """The first completion of `fact` with its tokens, subject token positions and answer's first token."""
    from .attention import token_offsets
    from .prompts import target_token
    text = fact["completions"][0]
    ids = list(tokenizer(text).input_ids)
    decoded, offsets = token_offsets(tokenizer, text, ids)
    start, end = subject_span(decoded, fact["subject"]) or (0, 0)
    subject = {k for k, (a, b) in enumerate(offsets) if a < end and b > start}
    return {"fact": fact, "text": text, "ids": ids, "subject_positions": subject,
            "answer_id": target_token(tokenizer, text, fact["target"]).token_id}


def is_clean_corrupt_pair(clean: dict, corrupt: dict) -> bool:
    """Whether two encoded completions (`_encoded_completion`) patch position by position: the same template
    with the subject swapped, the same token count, tokens that differ only at subject positions of both,
    and answers whose first tokens differ."""
    a, b = clean["fact"], corrupt["fact"]
    if a["subject"] == b["subject"] or clean["text"].count(a["subject"]) != 1:
        return False
    if clean["text"].replace(a["subject"], b["subject"]) != corrupt["text"] or len(clean["ids"]) != len(corrupt["ids"]):
        return False
    differing = {k for k, (x, y) in enumerate(zip(clean["ids"], corrupt["ids"])) if x != y}
    return (bool(differing) and differing <= clean["subject_positions"] & corrupt["subject_positions"]
            and clean["answer_id"] != corrupt["answer_id"])


def counterfactual_pairs(tokenizer, facts: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Up to `n` clean/corrupt prompt pairs for activation patching, built from the fact set.

    Each pair takes two facts of one relation whose first completions pass `is_clean_corrupt_pair` for this
    tokenizer. Relations take turns (so no relation crowds out the others), each fact is the clean prompt
    of at most one pair and two facts pair at most once; the order within a relation is shuffled with `seed`
    (same seed, same pairs). Fewer than `n` come back when the set has fewer.
    Returns [{"id", "clean", "corrupt", "clean_answer", "corrupt_answer", "relation"}] (004's pairs.json).
    """
    rng = random.Random(seed)
    queues = []
    for relation, group in sorted(relations(facts).items()):
        encoded = [_encoded_completion(tokenizer, fact) for fact in group]
        candidates = [(c, k) for c in encoded for k in encoded if c is not k and is_clean_corrupt_pair(c, k)]
        rng.shuffle(candidates)
        queues.append(candidates)
    pairs, used_clean, used_pairs = [], set(), set()
    while len(pairs) < n and any(queues):
        for queue in queues:
            while queue and len(pairs) < n:
                clean, corrupt = (e["fact"] for e in queue.pop(0))
                if clean["id"] in used_clean or frozenset((clean["id"], corrupt["id"])) in used_pairs:
                    continue
                used_clean.add(clean["id"])
                used_pairs.add(frozenset((clean["id"], corrupt["id"])))
                pairs.append({"id": f"{clean['id']}_vs_{corrupt['id']}", "clean": clean["completions"][0],
                              "corrupt": corrupt["completions"][0], "clean_answer": clean["target"],
                              "corrupt_answer": corrupt["target"], "relation": clean["relation"]})
                break
    return pairs
