"""Repositories shaped like the paper's, small enough to build in a test: tiny random models of the
three architectures of config/paper.yaml with their tokenizers and chat templates, a tiny
sentence-transformers embedder, and parquet prompt sets with the paper's field names.

Each builder writes an ordinary directory (what ``save_pretrained`` writes) that
:class:`hub_server.HubServer` then commits into a served git repository.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from support.models import TINY_VISION, word_tokenizer

# Words the tiny tokenizers know; the prompt sets below are written from them, so that no prompt
# falls apart into unknown tokens.
WORDS = (
    "a an the of to and in is it you that for on with as be at by this write code function "
    "return list number numbers sum total how many does have has each day week apples eggs "
    "sells buys price dollars come up original creative solution following real world problem "
    "jar lid stuck open without tools rope tree man woman walks into kitchen then picks knife "
    "starts cutting bread should self contained starting import def print python answer what "
    "solve find sort string reverse count words question her his they she he user assistant "
    "model system reply briefly"
).split()

# Special tokens of each family's chat format (their shapes follow the real families').
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# A Qwen3-style template whose thinking switch decides whether the answer starts with an empty
# reasoning block (thinking off) or lets the model think first (on, the default).
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# Sizes of every tiny decoder below: fast on a CPU, but grouped-query attention as in the real ones.
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def build_tokenizer(
    out_dir: Path,
    specials: list[str],
    *,
    bos: str | None,
    eos: str,
    pad: str | None = None,
    unk: str | None = None,
    chat_template: str | None = None,
    add_bos: bool = False,
):
    """A word-level tokenizer over :data:`WORDS` plus ``specials``, saved to ``out_dir``."""
    unknown = unk or "[UNK]"
    tokenizer = word_tokenizer(
        specials,
        [unknown, "\n", *WORDS, ".", ",", "?", ":", "'"],
        bos=bos,
        eos=eos,
        pad=pad or eos,
        unk=unknown,
        add_bos=add_bos,
        split_punctuation=True,
        chat_template=chat_template,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@dataclass(frozen=True)
class ChatTokens:
    """A family's special tokens as its tokenizer uses them; the base and the instruct variant
    differ in their EOS and in that only the instruct one has a chat template."""

    specials: list[str]
    bos: str | None
    pad: str
    base_eos: str
    instruct_eos: str
    template: str
    unk: str | None = None
    add_bos: bool = False


QWEN_TOKENS = ChatTokens(
    QWEN_SPECIALS, None, "<|endoftext|>", "<|endoftext|>", "<|im_end|>", QWEN_TEMPLATE
)
# Llama's and Gemma's tokenizers add BOS to raw text.
LLAMA_TOKENS = ChatTokens(
    LLAMA_SPECIALS,
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|end_of_text|>",
    "<|eot_id|>",
    LLAMA_TEMPLATE,
    add_bos=True,
)
GEMMA_TOKENS = ChatTokens(
    GEMMA_SPECIALS, "<bos>", "<pad>", "<eos>", "<end_of_turn>", GEMMA_TEMPLATE, "<unk>", True
)


def build_chat_tokenizer(out_dir: Path, tokens: ChatTokens, *, instruct: bool):
    """The base or the instruct variant's tokenizer of a family, saved to ``out_dir``."""
    return build_tokenizer(
        out_dir,
        tokens.specials,
        bos=tokens.bos,
        eos=tokens.instruct_eos if instruct else tokens.base_eos,
        pad=tokens.pad,
        unk=tokens.unk,
        chat_template=tokens.template if instruct else None,
        add_bos=tokens.add_bos,
    )


def _save_model(model, tokenizer, out_dir: Path, eos_ids: list[int]) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
    )
    model.save_pretrained(out_dir)


def build_qwen3(out_dir: Path, *, instruct: bool, seed: int = 0) -> None:
    """Qwen3 architecture (causal LM); the instruct variant's template has a thinking switch."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer(out_dir, QWEN_TOKENS, instruct=instruct)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        **TINY,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen3ForCausalLM(config)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    _save_model(model, tokenizer, out_dir, eos if instruct else eos[1:])


def build_llama31(out_dir: Path, *, instruct: bool, seed: int = 1) -> None:
    """Llama-3.1 architecture with llama3 rope scaling; BOS added to raw text as Llama's does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer(out_dir, LLAMA_TOKENS, instruct=instruct)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY,
        max_position_embeddings=1024,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")]
    _save_model(model, tokenizer, out_dir, ids if instruct else ids[:1])


def build_gemma3(out_dir: Path, *, instruct: bool, seed: int = 2) -> None:
    """Gemma-3 in its multimodal form (Gemma3ForConditionalGeneration, as gemma-3-12b-pt/-it
    ship), with sliding-window and global attention layers and a tiny vision tower."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_chat_tokenizer(out_dir, GEMMA_TOKENS, instruct=instruct)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GEMMA_SPECIALS}
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        max_position_embeddings=1024,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
        bos_token_id=ids["<bos>"],
    )
    vision = SiglipVisionConfig(**TINY_VISION, image_size=28, patch_size=14)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=1,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    model = Gemma3ForConditionalGeneration(config)
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    _save_model(model, tokenizer, out_dir, eos if instruct else eos[:1])


BUILDERS = {"qwen3": build_qwen3, "llama31": build_llama31, "gemma3": build_gemma3}


# Sizes of the tiny encoders (embedder, NLI model).
TINY_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


def build_encoder_tokenizer(out_dir: Path):
    """A BERT-style word tokenizer ([CLS] text [SEP]) for the tiny encoders."""
    return build_tokenizer(
        out_dir,
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        bos="[CLS]",
        eos="[SEP]",
        pad="[PAD]",
        unk="[UNK]",
    )


def build_embedder(out_dir: Path, *, seed: int = 3) -> None:
    """A sentence-transformers model over a tiny ModernBERT encoder, mean pooling, normalised."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import ModernBertConfig, ModernBertModel

    torch.manual_seed(seed)
    encoder_dir = out_dir.parent / f".{out_dir.name}.encoder"
    tokenizer = build_encoder_tokenizer(encoder_dir)
    config = ModernBertConfig(
        vocab_size=len(tokenizer),
        **TINY_ENCODER,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        global_attn_every_n_layers=2,
        local_attention=16,
    )
    ModernBertModel(config).save_pretrained(encoder_dir)
    encoder = Transformer(str(encoder_dir), max_seq_length=256)
    pooling = Pooling(embedding_dimension=encoder.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling, Normalize()]).save(str(out_dir))


def build_nli(out_dir: Path, *, seed: int = 4) -> None:
    """A DeBERTa sequence classifier with the three MNLI labels, as deberta-large-mnli has."""
    from transformers import DebertaConfig, DebertaForSequenceClassification

    torch.manual_seed(seed)
    tokenizer = build_encoder_tokenizer(out_dir)
    labels = ("CONTRADICTION", "NEUTRAL", "ENTAILMENT")
    config = DebertaConfig(
        vocab_size=len(tokenizer),
        **TINY_ENCODER,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    model = DebertaForSequenceClassification(config)
    with torch.no_grad():  # spread the logits, so that the label depends on the pair
        model.classifier.weight.mul_(200.0)
    model.save_pretrained(out_dir)


# Prompt sets with the paper's data sets' field names and layouts.
def _sentences(count: int, offset: int) -> list[str]:
    return [
        " ".join(WORDS[(offset + i * 7 + j * 3) % len(WORDS)] for j in range(6 + i % 4)) + "."
        for i in range(count)
    ]


def build_dataset(out_dir: Path, name: str, rows: int = 6) -> None:
    """A parquet data set laid out as the hub serves it: a dataset card naming configs and splits,
    data files under the paths the card points to."""
    if name == "bigcodebench":
        frame = pd.DataFrame(
            {
                "task_id": [f"BigCodeBench/{i}" for i in range(rows)],
                "instruct_prompt": [
                    f"Write a function to {s} You should write self contained code starting with: def f"
                    for s in _sentences(rows, 0)
                ],
            }
        )
        card = [("default", "v0.1.4", "data/v0.1.4-00000-of-00001.parquet")]
    elif name == "gsm8k":
        frame = pd.DataFrame(
            {"question": _sentences(rows, 11), "answer": [f"#### {i}" for i in range(rows)]}
        )
        card = [("main", "train", "main/train-00000-of-00001.parquet")]
    elif name == "hellaswag":
        frame = pd.DataFrame(
            {"ind": list(range(100, 100 + rows)), "ctx": _sentences(rows, 23), "label": "0"}
        )
        card = [("default", "validation", "data/validation-00000-of-00001.parquet")]
    elif name == "macgyver":
        frame = pd.DataFrame(
            {"Problem": _sentences(rows, 31), "ID": [f"m{i}" for i in range(rows)]}
        )
        card = [("default", "train", "data/train-00000-of-00001.parquet")]
    else:
        raise ValueError(name)
    lines = ["---", "configs:"]
    for config, split, path in card:
        (out_dir / path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out_dir / path, index=False)
        lines += [
            f"- config_name: {config}",
            "  data_files:",
            f"  - split: {split}",
            f"    path: {path}",
        ]
    lines += ["---", f"# {name} (a test copy)", ""]
    (out_dir / "README.md").write_text("\n".join(lines))


def model_card(name: str) -> str:
    return json.dumps({"name": name})
