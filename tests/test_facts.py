"""The lab's fact set (001_layers_and_logits/prompts.json) and the clean/corrupt pairs built from it."""
import json
from pathlib import Path

import pytest

from common.errors import LabError
from common.facts import check_facts, counterfactual_pairs, load_fact_set, relations, subject_span
from common.prompts import render_fact, target_token

FACTS_FILE = Path(__file__).parent.parent / "001_layers_and_logits" / "prompts.json"
# The facts of the first runs, kept word for word so earlier results stay comparable.
FIRST_FACTS = {
    "france_capital": ("Paris", "The capital of France is"), "germany_capital": ("Berlin", "The capital of Germany is"),
    "japan_capital": ("Tokyo", "The capital of Japan is"), "england_capital": ("London", "The capital of England is"),
    "gold_symbol": ("Au", "The chemical symbol for gold is"),
    "romeo_author": ("Shakespeare", "Romeo and Juliet was written by William"),
    "first_president": ("Washington", "The first president of the United States was George"),
    "opposite_hot": ("cold", "The opposite of hot is")}


@pytest.fixture(scope="module")
def facts():
    return load_fact_set(FACTS_FILE)


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_folder)


def test_fact_set_size_and_relations(facts):
    groups = relations(facts)
    assert len(facts) >= 100 and len(groups) >= 8
    assert all(len(group) >= 10 for group in groups.values()), {r: len(g) for r, g in groups.items()}
    assert all(len(f["completions"]) >= 2 for f in facts)
    # the main wording holds the subject exactly as written (002 labels it, pairs swap it)
    assert all(f["subject"] in f["completions"][0] for f in facts)


def test_first_facts_are_unchanged(facts):
    by_id = {f["id"]: f for f in facts}
    for fact_id, (target, completion) in FIRST_FACTS.items():
        assert by_id[fact_id]["target"] == target and by_id[fact_id]["completions"][0] == completion
    assert [f["id"] for f in facts[:8]] == list(FIRST_FACTS)  # still first, in their order


def test_counterfactuals_are_other_answers_of_the_relation(facts):
    for relation, group in relations(facts).items():
        answers = {f["target"] for f in group}
        for fact in group:
            assert fact["counterfactual"] in answers - {fact["target"]}, fact["id"]


def test_every_target_is_a_token_of_the_embedded_tokenizer(facts, tokenizer):
    """Targets resolve per tokenizer at load (first token of " " + answer); counterfactuals start elsewhere."""
    for fact in facts:
        prompt = render_fact(tokenizer, fact, "completion").text
        target = target_token(tokenizer, prompt, fact["target"])
        other = target_token(tokenizer, prompt, fact["counterfactual"])
        assert target.token.strip() and target.token_id != other.token_id, fact["id"]


def test_subject_span_matches_whole_words_and_sentence_starts():
    assert subject_span("The capital of France is", "France") == (15, 21)
    assert subject_span("Gold's chemical symbol is", "gold") == (0, 4)
    assert subject_span("The plural of woman is", "man") is None  # not inside another word
    assert subject_span("The opposite of hot is", "cold") is None


@pytest.mark.parametrize("change, fragment", [
    (lambda f: f.pop("relation"), "needs non-empty text for relation"),
    (lambda f: f.update(subject="Spain"), "is not a word of"),
    (lambda f: f.update(counterfactual=f["target"]), "has its target as counterfactual"),
])
def test_check_facts_refuses_bad_facts(facts, change, fragment):
    bad = json.loads(json.dumps(facts[:3]))
    change(bad[1])
    with pytest.raises(LabError, match=fragment):
        check_facts(bad)
    with pytest.raises(LabError, match="appears twice"):
        check_facts([facts[0], facts[0]])


def test_counterfactual_pairs_on_smollm2(facts, tokenizer):
    pairs = counterfactual_pairs(tokenizer, facts, n=30, seed=0)
    assert len(pairs) == 30
    assert len({p["relation"] for p in pairs}) >= 8  # relations take turns
    by_completion = {f["completions"][0]: f for f in facts}
    for pair in pairs:
        assert set(pair) == {"id", "clean", "corrupt", "clean_answer", "corrupt_answer", "relation"}
        clean, corrupt = by_completion[pair["clean"]], by_completion[pair["corrupt"]]
        assert clean["relation"] == corrupt["relation"] == pair["relation"] and clean is not corrupt
        assert (pair["clean_answer"], pair["corrupt_answer"]) == (clean["target"], corrupt["target"])
        clean_ids, corrupt_ids = tokenizer(pair["clean"]).input_ids, tokenizer(pair["corrupt"]).input_ids
        assert len(clean_ids) == len(corrupt_ids)
        differ = [k for k, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b]
        subject_text = "".join(tokenizer.decode([clean_ids[k]]) for k in range(differ[0], differ[-1] + 1))
        assert subject_text.strip() and subject_text.strip() in clean["subject"]  # they differ only in the subject
        assert (target_token(tokenizer, pair["clean"], pair["clean_answer"]).token_id
                != target_token(tokenizer, pair["corrupt"], pair["corrupt_answer"]).token_id)
    assert len({p["clean"] for p in pairs}) == len(pairs)  # each fact is clean at most once


def test_counterfactual_pairs_are_seeded(facts, tokenizer):
    first = counterfactual_pairs(tokenizer, facts, n=20, seed=1)
    assert first == counterfactual_pairs(tokenizer, facts, n=20, seed=1)
    assert first != counterfactual_pairs(tokenizer, facts, n=20, seed=2)
    everything = counterfactual_pairs(tokenizer, facts, n=10_000, seed=0)
    assert 20 <= len(everything) <= len(facts)  # fewer than asked when the set has no more


def test_pairs_load_as_004_pairs(facts, tokenizer, tmp_path):
    from common.patching import load_pairs
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(counterfactual_pairs(tokenizer, facts, n=20)))
    assert len(load_pairs(path)) == 20
