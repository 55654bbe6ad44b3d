"""Chat templates and chat-rendered (instruction, response) pairs: what fine-tuning trains on.

A pair is one user turn rendered through the chat template with the generation prompt, then the
response and the turn's end (EOS, or the template's end-of-turn token); the loss counts the
response tokens and that end only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import resources

import torch

__all__ = [
    "CHAT_TEMPLATES",
    "packaged_chat_template",
    "chat_ids",
    "encode_pair",
    "encode_pairs",
    "response_batch",
    "response_batches",
    "response_loss",
]

#: Chat templates (jinja) per tokenizer kind; every assistant turn ends with the EOS token, and
#: the generation prompt is exactly what precedes an assistant turn, so fine-tuning on rendered
#: pairs teaches the model to answer after the generation prompt and then emit EOS.
CHAT_TEMPLATES: dict[str, str] = {
    "byte_bpe": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
        "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
        "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "sentencepiece_bpe": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}<<SYS>>\n{{ message['content'] }}\n<</SYS>>\n"
        "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
        "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
        "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
        "{% endfor %}"
    ),
}
# The Llama-style template's generation prompt is the "[/INST]" that closes every user turn, so
# add_generation_prompt adds nothing further there.


def packaged_chat_template(name: str) -> str:
    """The chat template the package ships under ``name``: a trained family's, by its tokenizer
    kind (:data:`CHAT_TEMPLATES`), or a known turn format's, ``data/chat_templates/<name>.jinja``
    (Gemma's, for a base that ships without one). Raises ValueError for an unknown name."""
    if name in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[name]
    path = resources.files("canopy.training").joinpath("data", "chat_templates", f"{name}.jinja")
    if not path.is_file():
        raise ValueError(f"no packaged chat template named {name!r}")
    return path.read_text("utf-8").strip()


def chat_ids(tokenizer, messages: list[dict[str, str]], **kwargs) -> list[int]:
    """The token ids of ``messages`` rendered through the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_pair(
    tokenizer, instruction: str, response: str, max_length: int, end_id: int | None = None
) -> tuple[list[int], int] | None:
    """(token ids, number of prompt tokens) of one rendered pair, or None if it does not fit.

    The prompt part is exactly what :func:`canopy.modeling.format_prompt` feeds a fine-tuned model
    (chat template, one user turn, generation prompt); the rest is the response and ``end_id``
    (the template's end-of-turn token; EOS when None). A response that does not fit is cut
    (keeping at least 8 tokens) and then has no end.
    """
    prompt = chat_ids(
        tokenizer, [{"role": "user", "content": instruction}], add_generation_prompt=True
    )
    end = tokenizer.eos_token_id if end_id is None else end_id
    answer = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
    if len(prompt) + 8 > max_length:
        return None
    return (prompt + answer)[:max_length], len(prompt)


def response_batch(
    chosen: Sequence[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoded pairs padded on the right: input ids, attention mask and labels (-100 outside the
    responses)."""
    width = max(len(ids) for ids, _ in chosen)
    input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chosen), width), dtype=torch.long)
    labels = torch.full((len(chosen), width), -100, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(chosen):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, mask, labels


def response_batches(
    encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless seeded batches of :func:`response_batch` (each pass a new permutation)."""
    while True:
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for first in range(
            0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size
        ):
            yield response_batch([encoded[i] for i in order[first : first + batch_size]], pad_id)


def encode_pairs(
    tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, end_id: int | None = None
) -> list[tuple[list[int], int]]:
    """:func:`encode_pair` of each pair, leaving out those whose prompt does not fit."""
    encoded = []
    for instruction, response in pairs:
        item = encode_pair(tokenizer, instruction, response, max_length, end_id)
        if item is not None:
            encoded.append(item)
    return encoded


@torch.no_grad()
def response_loss(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str]],
    *,
    max_length: int | None = None,
    batch_size: int = 16,
    end_id: int | None = None,
) -> float:
    """Mean cross-entropy (nats per token) of the responses (and their end token, ``end_id`` or
    EOS) given the chat-rendered instructions; ``tokenizer`` must carry a chat template."""
    max_length = max_length or int(
        getattr(model.config, "max_position_embeddings", 0) or getattr(model.config, "n_positions")
    )
    encoded = encode_pairs(tokenizer, pairs, max_length, end_id)
    if not encoded:
        raise ValueError("no pair fits the model's context")
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(encoded), batch_size):
        chosen = encoded[first : first + batch_size]
        input_ids, mask, labels = response_batch(chosen, tokenizer.pad_token_id)
        device = next(model.parameters()).device
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        logits = logits[:, :-1]
        target = labels[:, 1:].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(losses)
        count += int((target != -100).sum())
    return total / count
