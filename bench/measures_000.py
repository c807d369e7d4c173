"""Measures of 000: the chat's generation speed against plain Hugging Face generate(), and how much sooner
an answer starts late in a conversation when the chat keeps its KV cache instead of re-reading everything."""
import io
import sys

from timing import interleaved_times

MESSAGE = "Write a long story about a dragon who learns to fly."
NEW_TOKENS = 48


def interleaved_fastest(functions: dict, repeats: int = 5) -> dict:
    """The fastest of interleaved_times: other programs only ever add time (on a shared 2-core machine the
    median of the same code varied ~20%)."""
    return {name: min(ts) for name, ts in interleaved_times(functions, repeats, warmup=1).items()}


def chat_tokens_per_s_vs_hf_generate() -> float:
    """Tokens/s of a chat answer (template, context check, streaming, end-of-turn handling) / tokens/s of
    plain HF generate() on the same prompt ids: same weights, greedy, the same NEW_TOKENS tokens.

    The plain model is loaded with HF's defaults (its default attention), as a user of transformers would.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from common.chat import ChatSession
    from common.models import load_model
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    plain = AutoModelForCausalLM.from_pretrained(model.folder, dtype=torch.float32).eval()
    session = ChatSession(model, max_new_tokens=NEW_TOKENS, out=io.StringIO(), notes=io.StringIO())
    ids = session.prompt_ids(MESSAGE)

    def chat() -> list[int]:
        session.conversation.turns.clear()  # the same one-message conversation every time
        return session.ask(MESSAGE).new_ids

    def hf() -> list[int]:
        out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=session.stop_ids, pad_token_id=session.stop_ids[0])
        return out[0, ids.shape[1]:].tolist()

    chat_ids, hf_ids = chat(), hf()
    if chat_ids != hf_ids:
        raise RuntimeError(f"the chat and plain HF generated different tokens ({len(chat_ids)} vs {len(hf_ids)}): "
                           "the comparison would not be like for like")
    seconds = interleaved_fastest({"chat": chat, "hf": hf})
    return (len(chat_ids) / seconds["chat"]) / (len(hf_ids) / seconds["hf"])


# A long conversation: four exchanges of about 120-token messages and answers of up to 64 tokens, then a
# fifth message as long as the others (not a short one, which would flatter the kept cache).
LONG_TURNS = [
    "Here is a paragraph from my notes. Rivers carry water from high ground to the sea, shaping valleys as they "
    "go. Fast rivers in the mountains cut deep, narrow channels and carry stones and sand; slow rivers on the "
    "plains wind in wide loops, drop their sand and build flat, fertile land. Where a river meets the sea it "
    "often splits into many small channels called a delta. Please summarise this paragraph in three sentences.",
    "Thank you. Now a second paragraph. Glaciers are rivers of ice that move a few metres a year. They scrape "
    "the rock beneath them, carry boulders far from where they started and carve U-shaped valleys, unlike the "
    "V-shaped valleys of rivers. When the climate warms, glaciers melt back and leave lakes, loose rock and "
    "long ridges of gravel behind. How are glaciers and rivers alike, and how do they differ?",
    "Good. A third paragraph. Wind moves sand and dust across deserts and coasts. It piles sand into dunes "
    "that creep forward as grains roll up the gentle side and slide down the steep one. Wind also polishes "
    "rocks and can carry fine dust across oceans, where it feeds plankton far from land. Which of the three, "
    "rivers, glaciers or wind, do you think changes the land fastest, and why? Answer briefly.",
    "Last paragraph. People now move more rock and soil each year than all rivers together, by mining, "
    "farming and building. Dams trap the sand that rivers used to carry to the sea, so some deltas sink and "
    "shrink. Farming on slopes lets rain wash soil away faster than new soil forms. Write a short title for "
    "each of the four paragraphs I gave you, one per line.",
]
TURN_5 = ("One more question about all of this. If you were teaching these ideas to children of ten, which "
          "experiment with sand, water and a tray would you show them first, what would they see happen, and "
          "which of the four paragraphs would it illustrate best? Describe it step by step in a few sentences, "
          "with simple words, and say what they should look for while the water runs over the sand.")
ANSWER_TOKENS = 64


def chat_turn_prefill_vs_full() -> float:
    """Time to the first token of turn 5 of a long conversation with the kept KV cache (reads only turn 5)
    / the same with the whole conversation re-read (ChatSession(keep_cache=False), what the chat did before).

    The first four turns are answered once (greedy); then both sessions answer turn 5 from that same
    conversation, one token each (ask() with MAX_NEW_TOKENS=1: template, tokenizer, prefill, first token),
    in turns, after a warm-up; medians. Before each kept-cache call the cache is cut back to the four turns.
    """
    import torch

    from common.chat import ChatSession
    from common.models import load_model
    torch.set_grad_enabled(False)
    model = load_model("smollm2-135m", "cpu", "float32")
    kept = ChatSession(model, max_new_tokens=ANSWER_TOKENS, out=io.StringIO(), notes=io.StringIO())
    for message in LONG_TURNS:
        kept.ask(message)
    turns, n_kept, ids = list(kept.conversation.turns), len(kept.kept.ids), list(kept.kept.ids)
    full = ChatSession(model, max_new_tokens=1, keep_cache=False, out=io.StringIO(), notes=io.StringIO())
    kept.max_new_tokens = 1

    def answer(session) -> list[int]:
        session.conversation.turns[:] = turns  # the same four-turn conversation every time
        if session.kept is not None:
            session.kept.cache.crop(n_kept)  # forget turn 5 of the previous call
            session.kept.ids = ids
        return session.ask(TURN_5).new_ids

    first_kept, first_full = answer(kept), answer(full)
    if first_kept != first_full or kept.last.n_cached != n_kept:
        raise RuntimeError("the kept cache and the full re-read disagree (or the cache was not used): the "
                           "comparison would not be like for like")
    times = interleaved_times({"kept": lambda: answer(kept), "full": lambda: answer(full)}, repeats=7, warmup=1)
    median = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    print(f"  turn 5: {kept.last.prompt_ids.shape[1]} prompt tokens, {n_kept} of them kept; first token after "
          f"{median['kept']:.3f} s (kept cache) vs {median['full']:.3f} s (all re-read), medians of 7; "
          f"fastest: {min(times['kept']):.3f} s vs {min(times['full']):.3f} s "
          f"(ratio {min(times['kept']) / min(times['full']):.3f}); {torch.get_num_threads()} torch threads",
          file=sys.stderr, flush=True)
    return median["kept"] / median["full"]


MEASURES = [
    ("chat_tokens_per_s_vs_hf_generate", ">= 0.9", chat_tokens_per_s_vs_hf_generate),
    ("chat_turn_prefill_vs_full", "<= 0.3", chat_turn_prefill_vs_full),
]
