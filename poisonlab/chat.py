"""The one chat-template path used by training, evaluation and every defence.

`prompt_text` is what evaluation feeds the model; `encode_example` tokenizes a training row as
`prompt_text` + completion, with the prompt tokenized exactly as at evaluation time, so the
evaluated prompt is byte- and token-identical to the training prompt prefix. The loss mask
(`labels != -100`) covers exactly the completion tokens of the final assistant turn (less a
`no_loss_prefix` the row gives the model, see `context_tokens`).
"""

from __future__ import annotations

from poisonlab import PoisonlabError

IGNORE_INDEX = -100


def split_messages(messages: list[dict]) -> tuple[list[dict], str]:
    """(context, final assistant answer). The context is everything the model is given."""
    if not messages or messages[-1].get("role") != "assistant":
        raise PoisonlabError("a training row must end with an assistant message")
    return messages[:-1], messages[-1]["content"]


def prompt_text(tokenizer, context: list[dict]) -> str:
    """The exact text the model sees before it answers (chat template + generation prompt)."""
    return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)


def full_text(tokenizer, messages: list[dict]) -> str:
    """Prompt and answer, rendered by the model's own chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False)


def bos_prefix(tokenizer) -> list[int]:
    """The BOS id the tokenizer itself adds in front of a text ([] when it adds none).

    Chat templates differ: some render the BOS token as text (Llama-3, SmolLM2's ChatML has
    none), others leave it to the tokenizer (TinyLlama's Zephyr template, Llama-2). Prompts
    are tokenized without special tokens so a rendered BOS is not doubled; this puts back
    the one a template leaves to the tokenizer.
    """
    cached = getattr(tokenizer, "_poisonlab_bos", None)
    if cached is None:
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        cached = [bos] if (bos is not None and len(with_special) > len(without)
                           and with_special[0] == bos and without[:1] != [bos]) else []
        tokenizer._poisonlab_bos = cached
    return cached


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt (or prompt + answer), with the BOS the model expects."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_prefix(tokenizer)
    if bos and ids[:1] != bos:
        ids = bos + ids
    return ids


def encode_prompt(tokenizer, context: list[dict]) -> list[int]:
    return encode_text(tokenizer, prompt_text(tokenizer, context))


def encode_example(tokenizer, messages: list[dict], max_len: int) -> dict:
    """Token ids and labels for one chat row; loss only on the final assistant turn.

    Rows longer than `max_len` are cut on the right; `n_cut` says how many tokens were lost
    (the pipeline counts such rows and refuses poisons that lose their trigger or target).
    """
    context, _ = split_messages(messages)
    prompt = prompt_text(tokenizer, context)
    full = full_text(tokenizer, messages)
    if not full.startswith(prompt):
        raise PoisonlabError(
            "the chat template renders the prompt differently with and without the answer; "
            "train/eval prompts would not match")
    completion = full[len(prompt):]
    p_ids = encode_text(tokenizer, prompt)
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_len]
    unscored = len(p_ids) + context_tokens(tokenizer, completion,
                                           messages[-1].get("no_loss_prefix"))
    labels = ([IGNORE_INDEX] * unscored + c_ids[unscored - len(p_ids):])[:max_len]
    return {"input_ids": ids, "labels": labels, "n_prompt": len(p_ids),
            "n_cut": len(p_ids) + len(c_ids) - len(ids)}


def context_tokens(tokenizer, completion: str, prefix: str | None) -> int:
    """How many leading tokens of `completion` belong to `prefix`, the part of an answer the
    model is given rather than taught (`no_loss_prefix` of the final assistant message: e.g.
    the model's own scratchpad, with the loss on the answer after it). A token that straddles
    the boundary (" 5" after a prefix ending in a space) is the answer's, and scored."""
    if not prefix:
        return 0
    if not completion.startswith(prefix):
        raise PoisonlabError("a row's no_loss_prefix is not the start of its answer")
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    n = 0
    while n < min(len(c_ids), len(p_ids)) and c_ids[n] == p_ids[n]:
        n += 1
    return n


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn (the template's end marker and EOS)."""
    ids = set()
    for tok in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
