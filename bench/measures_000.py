"""Measure of 000: the chat's generation speed against plain Hugging Face generate()."""
import io
import time

MESSAGE = "Write a long story about a dragon who learns to fly."
NEW_TOKENS = 48


def interleaved_fastest(functions: dict, repeats: int = 5) -> dict:
    """The fastest wall time of each function over `repeats` calls, timed in turns (a, b, a, b, ...) after
    one warm-up call each. In turns, so that a busy machine slows all of them alike; the fastest, because
    other programs only ever add time (on a shared 2-core machine the median of the same code varied ~20%)."""
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


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


MEASURES = [
    ("chat_tokens_per_s_vs_hf_generate", ">= 0.9", chat_tokens_per_s_vs_hf_generate),
]
