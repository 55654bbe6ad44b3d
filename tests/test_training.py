"""canopy.training: recipes, the two tokenizer kinds, and short real pre-training and fine-tuning
runs of both families whose directories must work with canopy.modeling exactly as downloaded
models do."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from canopy.config import ConfigError  # noqa: E402
from canopy.training.corpus import CorpusSettings, pretraining_documents, sft_pairs  # noqa: E402
from canopy.modeling import eos_token_ids, format_prompt, load_model  # noqa: E402
from canopy.training import (  # noqa: E402
    CHAT_TEMPLATES,
    ROLE_MARKERS,
    Recipe,
    encode_pair,
    finetune,
    pretrain_base,
    response_loss,
    train_tokenizer,
)
from canopy.sources.record import RECORD_FILE  # noqa: E402
from canopy.training.chat import response_batches  # noqa: E402
from canopy.training.pretrain import token_stream  # noqa: E402

FAMILIES = {
    "gpt2": {"architecture": "gpt2", "tokenizer": "byte_bpe"},
    "llama": {"architecture": "llama", "tokenizer": "sentencepiece_bpe"},
}
TINY = {
    "vocab_size": 400,
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "context_length": 128,
    "pretrain_steps": 40,
    "sft_steps": 40,
    "batch_size": 8,
    "learning_rate": 0.01,
    "sft_learning_rate": 0.003,
    "seed": 3,
}


def tiny_recipe(family: str, **changes) -> Recipe:
    return Recipe.from_config({**FAMILIES[family], **TINY, **changes}, name=family)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[tuple[str, str]]]:
    return pretraining_documents(300, 3), sft_pairs(160, 3)


@pytest.fixture(scope="module")
def families(corpus, tmp_path_factory) -> dict[str, dict]:
    """Both families pre-trained and fine-tuned for a few steps."""
    torch.set_num_threads(1)
    documents, pairs = corpus
    trained = {}
    for family in FAMILIES:
        recipe = tiny_recipe(family)
        root = tmp_path_factory.mktemp(family)
        base_record = pretrain_base(documents, recipe, root / "base", threads=1)
        finetuned_record = finetune(root / "base", pairs, recipe, root / "finetuned", threads=1)
        trained[family] = {
            "family": family,
            "recipe": recipe,
            "root": root,
            "base": base_record,
            "finetuned": finetuned_record,
            "pairs": pairs,
        }
    return trained


@pytest.fixture(params=list(FAMILIES))
def trained(request, families) -> dict:
    return families[request.param]


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def test_recipe_defaults_and_errors_name_the_key() -> None:
    recipe = Recipe.from_config(
        {"architecture": "llama", "tokenizer": "sentencepiece_bpe", "learning_rate": 1}, name="r"
    )
    assert recipe.learning_rate == 1.0 and isinstance(recipe.learning_rate, float)
    assert recipe.vocab_size == Recipe.model_fields["vocab_size"].default
    cases = [
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "layers": 2},
            r"training\.recipes\.r\.layers = 2: unknown key",
        ),
        (
            {"architecture": "gpt3", "tokenizer": "byte_bpe"},
            r"training\.recipes\.r\.architecture = 'gpt3': Input should be 'gpt2' or 'llama'",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "wordpiece"},
            r"training\.recipes\.r\.tokenizer = 'wordpiece': Input should be",
        ),
        (
            {"tokenizer": "byte_bpe"},
            r"training\.recipes\.r\.architecture = None: required key is missing",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "num_layers": 0},
            r"training\.recipes\.r\.num_layers = 0: Input should be greater than or equal to 1",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "batch_size": 2.5},
            r"training\.recipes\.r\.batch_size = 2\.5: Input should be a valid integer",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "learning_rate": 0},
            r"training\.recipes\.r\.learning_rate = 0: Input should be greater than 0",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "hidden_size": 30, "num_heads": 4},
            r"divisible by num_heads",
        ),
        (
            {"architecture": "gpt2", "tokenizer": "byte_bpe", "adam_beta2": 1},
            r"training\.recipes\.r\.adam_beta2 = 1: Input should be less than 1",
        ),
    ]
    for block, message in cases:
        with pytest.raises(ConfigError, match=message):
            Recipe.from_config(block, name="r")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

TEXTS = [
    "Maya has 42 apples. She gives 7 of them to Tom.\nThe answer is 35.",
    "def f(numbers: List[int]):\n    return [n * n for n in numbers]  # squares",
    "Ünïcode and emoji ✓ survive byte fallback: café, naïve, 東京",
    "Tabs\tand  double  spaces,\n\nblank lines.",
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizers_round_trip_and_carry_the_special_tokens(family: str, corpus) -> None:
    recipe = tiny_recipe(family, vocab_size=500)
    tokenizer = train_tokenizer(corpus[0], recipe)
    assert 300 <= len(tokenizer) <= 520
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    # The chat role markers are single special tokens.
    for marker in ROLE_MARKERS[recipe.tokenizer]:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
        assert marker in tokenizer.all_special_tokens
    # Llama style prepends BOS to every text, GPT-2 style does not.
    first = tokenizer("hello")["input_ids"][0]
    assert (first == tokenizer.bos_token_id) == (family == "llama")


def test_the_two_tokenizer_kinds_differ(corpus) -> None:
    gpt2 = train_tokenizer(corpus[0], tiny_recipe("gpt2"))
    llama = train_tokenizer(corpus[0], tiny_recipe("llama"))
    assert type(gpt2.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    steps = json.loads(llama.backend_tokenizer.to_str())["pre_tokenizer"]["pretokenizers"]
    assert steps[0]["type"] == "Metaspace"
    # An indentation run is one piece (which BPE can merge), not one piece per space.
    pieces = [p for p, _ in llama.backend_tokenizer.pre_tokenizer.pre_tokenize_str("    return x")]
    assert pieces == ["▁▁▁", "▁return", "▁x"]
    assert "<0x41>" in llama.get_vocab() and "<0x41>" not in gpt2.get_vocab()
    text = "Emma buys 3 pencils."
    assert gpt2.convert_ids_to_tokens(gpt2(text)["input_ids"]) != llama.convert_ids_to_tokens(
        llama(text)["input_ids"]
    )


# ---------------------------------------------------------------------------------------------
# Trained families
# ---------------------------------------------------------------------------------------------


def test_directories_load_with_local_files_only(trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for variant in ("base", "finetuned"):
        directory = trained["root"] / variant
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
        assert model.config.model_type == trained["family"]
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.config.vocab_size == len(tokenizer)
        assert (directory / "generation_config.json").is_file()
        log = json.loads((directory / RECORD_FILE).read_text())
        assert log["stage"] == ("pretrain" if variant == "base" else "finetune")
        assert len(log["loss"]) == (
            TINY["pretrain_steps"] if variant == "base" else TINY["sft_steps"]
        )
    # Nothing temporary is left next to the model directories.
    assert sorted(p.name for p in trained["root"].iterdir()) == ["base", "finetuned"]


def test_base_model_learned_the_corpus(trained) -> None:
    record = trained["base"]
    assert record["uniform_loss"] == pytest.approx(math.log(record["vocab_size"]))
    assert record["final_loss"] < record["uniform_loss"] - 1.0
    assert sum(record["loss"][:5]) / 5 > record["final_loss"] + 0.5


def test_chat_template_and_the_modeling_contract(trained) -> None:
    base = load_model(trained["root"] / "base", device="cpu", dtype="float32")
    finetuned = load_model(trained["root"] / "finetuned", device="cpu", dtype="float32")
    assert not getattr(base.tokenizer, "chat_template", None)
    template = finetuned.tokenizer.chat_template
    assert template == CHAT_TEMPLATES[trained["recipe"].tokenizer]
    rendered = finetuned.tokenizer.apply_chat_template(
        [{"role": "user", "content": "How many apples?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    expected = {
        "gpt2": "<|user|>\nHow many apples?\n<|assistant|>\n",
        "llama": "<s>[INST] How many apples? [/INST]",
    }[trained["family"]]
    assert rendered == expected
    # An assistant turn ends with EOS.
    conversation = finetuned.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        tokenize=False,
    )
    assert conversation.rstrip("\n").endswith("Hello" + finetuned.tokenizer.eos_token)
    # format_prompt (canopy.modeling) feeds the fine-tuned model exactly the prompt part it was
    # trained on, and the EOS it learned to emit is among the ids that end a rollout.
    instruction, response = trained["pairs"][0]
    ids, n_prompt = encode_pair(finetuned.tokenizer, instruction, response, 10_000)
    assert ids[:n_prompt] == format_prompt(finetuned.tokenizer, instruction, "finetuned")
    assert ids[-1] == finetuned.tokenizer.eos_token_id
    assert finetuned.tokenizer.eos_token_id in eos_token_ids(finetuned.model, finetuned.tokenizer)
    assert format_prompt(base.tokenizer, "Emma has 3 apples.", "base")


def test_finetuning_lowers_the_response_loss(trained) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = trained["root"]
    tokenizer = AutoTokenizer.from_pretrained(root / "finetuned", local_files_only=True)
    pairs = trained["pairs"][:48]
    before = response_loss(
        AutoModelForCausalLM.from_pretrained(root / "base", local_files_only=True), tokenizer, pairs
    )
    after = response_loss(
        AutoModelForCausalLM.from_pretrained(root / "finetuned", local_files_only=True),
        tokenizer,
        pairs,
    )
    assert after < before - 0.3, (before, after)
    sft = trained["finetuned"]["loss"]
    assert sum(sft[-5:]) / 5 < sum(sft[:5]) / 5


def test_a_family_fine_tunes_by_the_recipe_it_derives_on_the_one_path(trained) -> None:
    """A trained family's fine-tune is a recipe of the path every fine-tune takes: its sft_* keys,
    the context as the pair length, its tokenizer kind's chat template, nothing held out, and
    every weight trained (the embeddings too, where the chat template's role markers live). The
    record names the family's own recipe, which the report reads its architecture from."""
    from safetensors.torch import load_file

    recipe = trained["recipe"]
    derived = recipe.finetune_recipe()
    assert (derived.steps, derived.learning_rate, derived.batch_size, derived.max_length) == (
        recipe.sft_steps,
        recipe.sft_learning_rate,
        recipe.batch_size,
        recipe.context_length,
    )
    assert (derived.lora_rank, derived.heldout_pairs, derived.device) == (0, 0, "cpu")
    assert derived.chat_template == recipe.tokenizer and derived.seed == recipe.seed
    record = trained["finetuned"]
    assert record["recipe"] == recipe.to_config() and record["heldout_pairs"] == 0
    assert record["stage"] == "finetune" and len(record["loss"]) == recipe.sft_steps
    base = load_file(trained["root"] / "base" / "model.safetensors")
    finetuned = load_file(trained["root"] / "finetuned" / "model.safetensors")
    assert base.keys() == finetuned.keys()
    unchanged = [name for name in base if torch.equal(base[name], finetuned[name])]
    assert not unchanged, f"a full fine-tune left {unchanged} as the base had them"


def test_the_two_families_differ(families) -> None:
    from transformers import AutoConfig, AutoTokenizer

    configs = {
        f: AutoConfig.from_pretrained(t["root"] / "base", local_files_only=True)
        for f, t in families.items()
    }
    assert {f: c.model_type for f, c in configs.items()} == {"gpt2": "gpt2", "llama": "llama"}
    tokenizers = {
        f: AutoTokenizer.from_pretrained(t["root"] / "finetuned", local_files_only=True)
        for f, t in families.items()
    }
    assert tokenizers["gpt2"].eos_token != tokenizers["llama"].eos_token
    assert tokenizers["gpt2"].chat_template != tokenizers["llama"].chat_template


def test_the_recipe_sets_the_schedule(corpus, tmp_path: Path) -> None:
    """Warm-up from zero over warmup_fraction of the steps to the peak, then cosine decay towards
    min_lr_ratio times the peak; the record keeps the rate of every step."""
    recipe = tiny_recipe("gpt2", pretrain_steps=20, warmup_fraction=0.2, min_lr_ratio=0.5)
    record = pretrain_base(corpus[0][:100], recipe, tmp_path / "m", threads=1)
    rates = record["lr"]
    peak = recipe.learning_rate
    assert len(rates) == 20 and record["recipe"]["warmup_fraction"] == 0.2
    assert rates[:5] == pytest.approx([0.0, peak / 4, peak / 2, 3 * peak / 4, peak])
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))
    assert 0.5 * peak < rates[-1] < 0.51 * peak
    rerun = pretrain_base(
        corpus[0][:100], recipe.model_copy(update={"weight_decay": 0.5}), tmp_path / "n", threads=1
    )
    assert rerun["lr"] == rates and rerun["loss"] != record["loss"]


def test_pretraining_is_deterministic_and_replaces_the_output(corpus, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    recipe = tiny_recipe("llama", pretrain_steps=4)
    first = pretrain_base(corpus[0][:100], recipe, tmp_path / "a", threads=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.txt").write_text("from an older run")
    second = pretrain_base(corpus[0][:100], recipe, tmp_path / "b", threads=1)
    assert first["loss"] == second["loss"]
    assert not (tmp_path / "b" / "stale.txt").exists()
    from safetensors.torch import load_file

    weights_a = load_file(tmp_path / "a" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# The embedded default's own training data
# ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())


@pytest.fixture(scope="module")
def default_corpus() -> tuple[list[str], list[tuple[str, str]]]:
    settings = CorpusSettings.from_config(DEFAULT_CONFIG["training"]["corpus"])
    return (
        pretraining_documents(settings.pretrain_documents, settings.seed),
        sft_pairs(settings.sft_pairs, settings.seed),
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_training_examples_end_with_eos_under_the_loss(family: str, default_corpus) -> None:
    """A model learns to end only from examples that end: in the default's corpus, tokenised as
    its recipe does, every document is followed by EOS, and every fine-tuning example fits the
    context whole, ends with EOS and has that EOS among its loss targets. Its responses are also
    shorter than the default's max_new_tokens, so a model that answers like its fine-tuning data
    ends before the cap."""
    documents, pairs = default_corpus
    recipe = Recipe.from_config(DEFAULT_CONFIG["training"]["recipes"][family], name=family)
    tokenizer = train_tokenizer(documents, recipe)
    eos = tokenizer.eos_token_id
    stream = token_stream(documents, tokenizer)
    leading = 1 if tokenizer.bos_token_id == eos else 0
    assert int((stream == eos).sum()) == len(documents) + leading
    assert int(stream[-1]) == eos

    tokenizer.chat_template = CHAT_TEMPLATES[recipe.tokenizer]
    encoded = [encode_pair(tokenizer, i, r, recipe.context_length) for i, r in pairs]
    assert all(item is not None for item in encoded), "a prompt does not fit the context"
    lengths = []
    for (instruction, response), (ids, n_prompt) in zip(pairs, encoded):
        whole = len(tokenizer(response, add_special_tokens=False)["input_ids"]) + 1
        assert len(ids) == n_prompt + whole, f"cut by the context: {instruction[:60]!r}"
        assert ids[-1] == eos
        lengths.append(whole)
    caps = {s["max_new_tokens"] for s in DEFAULT_CONFIG["sampling"].values()}
    assert max(lengths) <= min(caps), (max(lengths), caps)

    generator = torch.Generator().manual_seed(0)
    input_ids, mask, labels = next(response_batches(encoded, tokenizer.pad_token_id, 64, generator))
    for row in range(input_ids.shape[0]):
        last = int(mask[row].sum()) - 1
        assert int(input_ids[row, last]) == eos and int(labels[row, last]) == eos
