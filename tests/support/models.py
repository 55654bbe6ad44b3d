"""Tiny models with random weights and word-level tokenizers.

Real transformers models (causal LMs, a reward model's config, an NLI classifier) built from a
config under a fixed seed, and real ``tokenizers`` word-level tokenizers, saved as ordinary model
directories; the tests and the benchmarks build theirs here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<user> {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
# A template with a system turn and a thinking switch, the way Qwen3's has one.
THINKING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<sys> {{ message['content'] }} "
    "{% else %}<user> {{ message['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>"
    "{% if enable_thinking is defined and not enable_thinking %} <think> </think>{% endif %}"
    "{% endif %}"
)

WORDS = ["the", "cat", "dog", "sat", "on", "a", "mat", "and", "ran", "far", "away", "big"]
THINKING_WORDS = WORDS + ["<sys>", "<think>", "</think>", "be", "brief"]

BASE_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_SPECIALS = BASE_SPECIALS + ["<user>", "<assistant>", "<end_turn>"]
TURN_SPECIALS = BASE_SPECIALS + ["<start_of_turn>", "<end_of_turn>"]


#: The vision tower of the tiny multimodal Gemma-3 models (image and patch sizes set per model).
TINY_VISION = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}


def word_tokenizer(
    specials: Sequence[str],
    words: Sequence[str],
    *,
    bos: str | None = "<bos>",
    eos: str = "<eos>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    add_bos: bool = True,
    split_punctuation: bool = False,
    chat_template: str | None = None,
):
    """A fast word-level tokenizer: ``specials`` take the first ids, then ``words``.

    The specials other than BOS, EOS, PAD and UNK become additional special tokens; ``add_bos`` makes
    the plain encoding start with BOS, as Llama's and Gemma's tokenizers do.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*specials, *words]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        if split_punctuation
        else pre_tokenizers.WhitespaceSplit()
    )
    if add_bos and bos is not None:
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    extra = [t for t in specials if t not in {bos, eos, pad, unk}]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        # Only where there are some: an empty list is saved, and changes the saved directory.
        **({"additional_special_tokens": extra} if extra else {}),
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_tokenizer(words: Sequence[str] = WORDS, *, chat_template: str | None = CHAT_TEMPLATE):
    """The chat tokenizer of the tiny Llama: user/assistant/end-of-turn specials; adds BOS."""
    return word_tokenizer(CHAT_SPECIALS, words, chat_template=chat_template)


def build_turn_tokenizer(pairs: Sequence[tuple[str, str]]):
    """A word-level tokenizer over the pairs' words, with Gemma's turn tokens as specials."""
    words = sorted({w for pair in pairs for text in pair for w in text.split()} | {"user", "model"})
    return word_tokenizer(TURN_SPECIALS, words)


def llama_config(
    vocab_size: int,
    *,
    hidden: int = 32,
    intermediate: int | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 128,
    eos: int | list[int] = 2,
    **extra,
):
    """A tiny Llama config: PAD 0, BOS 1, untied embeddings; ``extra`` adds or overrides keys."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**values, **extra})


def build_llama(
    vocab_size: int,
    *,
    seed: int = 0,
    eos: int | list[int] = 2,
    logit_scale: float = 1.0,
    spread: bool = True,
    **shape,
):
    """A tiny Llama-style causal LM with random weights (fixed seed); ``shape`` as llama_config's.

    ``spread`` redraws every weight with a large spread, so that the next-token distributions are
    far from uniform (transformers' own initialisation gives nearly flat ones); the benchmarks keep
    transformers' initialisation, whose near-uniform rows rarely end and so run to the cap.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = llama_config(vocab_size, eos=eos, **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if spread:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.5 if parameter.ndim > 1 else 0.1)
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config = GenerationConfig(eos_token_id=eos, bos_token_id=1, pad_token_id=0)
    return model


def build_gpt2(
    vocab_size: int,
    *,
    hidden: int = 32,
    layers: int = 2,
    context: int = 128,
    seed: int = 0,
    eos: int = 2,
):
    """A tiny GPT-2-style causal LM with random weights (fixed seed)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=context,
        bos_token_id=1,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def save_model_dir(path: Path, model, tokenizer) -> Path:
    """Save ``model`` and ``tokenizer`` together as one model directory."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_model_dir(
    path: Path, *, chat_template: str | None = CHAT_TEMPLATE, **model_kwargs
) -> Path:
    """A complete tiny Llama model directory with the word-level chat tokenizer."""
    tokenizer = build_tokenizer(chat_template=chat_template)
    return save_model_dir(path, build_llama(len(tokenizer), **model_kwargs), tokenizer)


NLI_WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "a", "big", "small"]


def build_nli_dir(
    root: Path, labels: Sequence[str] = ("contradiction", "neutral", "entailment"), seed: int = 0
) -> Path:
    """A tiny BERT sequence-pair classifier with ``labels``, saved as ``root``/nli."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *NLI_WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    config = BertConfig(
        vocab_size=len(NLI_WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # spread the logits, so that the labels depend on the pair
        model.classifier.weight.mul_(200.0)
    out = root / "nli"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
