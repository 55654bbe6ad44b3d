"""canopy.modeling: loading a model directory, prompt formatting per variant, EOS ids.

The tiny models and word-level tokenizers are tests/support/models.py's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from canopy.modeling import (  # noqa: E402
    LoadedModel,
    ModelNotFoundError,
    chat_options,
    check_chat_options,
    context_length,
    visible_cuda_devices,
    end_of_turn_ids,
    eos_token_ids,
    format_prompt,
    load_model,
)
from support.models import (  # noqa: E402
    THINKING_TEMPLATE,
    THINKING_WORDS,
    WORDS,
    build_gpt2,
    build_llama,
    build_model_dir,
    build_tokenizer,
)


def test_load_model_reads_a_local_directory_on_cpu(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    loaded = load_model(model_dir)
    assert isinstance(loaded, LoadedModel)
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert next(loaded.model.parameters()).dtype == torch.float32
    half = load_model(model_dir, device="cpu", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_missing_or_incomplete_model_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "resources" / "models" / "fam" / "base"
    with pytest.raises(ModelNotFoundError, match="families.<family>.<variant>.path") as error:
        load_model(missing)
    assert str(missing) in str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    missing.mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(missing)


def test_unknown_dtype_and_device_are_clear_errors(tmp_path: Path) -> None:
    model_dir = build_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        load_model(model_dir, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load_model(model_dir, device="cuda")


def test_base_prompt_is_raw_text_with_bos() -> None:
    tokenizer = build_tokenizer()
    ids = format_prompt(tokenizer, "the cat sat", "base")
    vocab = tokenizer.get_vocab()
    assert ids == [vocab["<bos>"], vocab["the"], vocab["cat"], vocab["sat"]]


def test_finetuned_prompt_uses_the_chat_template_with_generation_prompt() -> None:
    tokenizer = build_tokenizer()
    ids = format_prompt(tokenizer, "the cat sat", "finetuned")
    vocab = tokenizer.get_vocab()
    assert ids == [vocab[w] for w in ["<user>", "the", "cat", "sat", "<assistant>"]]
    assert all(isinstance(i, int) for i in ids)


def test_chat_template_kwargs_and_system_prompt_shape_the_finetuned_prompt() -> None:
    tokenizer = build_tokenizer(THINKING_WORDS, chat_template=THINKING_TEMPLATE)
    vocab = tokenizer.get_vocab()

    def words(ids: list[int]) -> list[str]:
        names = {index: word for word, index in vocab.items()}
        return [names[i] for i in ids]

    plain = format_prompt(tokenizer, "the cat", "finetuned")
    assert words(plain) == ["<user>", "the", "cat", "<assistant>"]
    no_thinking = format_prompt(
        tokenizer, "the cat", "finetuned", chat_template_kwargs={"enable_thinking": False}
    )
    assert words(no_thinking) == ["<user>", "the", "cat", "<assistant>", "<think>", "</think>"]
    thinking = format_prompt(
        tokenizer, "the cat", "finetuned", chat_template_kwargs={"enable_thinking": True}
    )
    assert thinking == plain
    with_system = format_prompt(tokenizer, "the cat", "finetuned", system_prompt="be brief")
    assert words(with_system) == ["<sys>", "be", "brief", "<user>", "the", "cat", "<assistant>"]
    with pytest.raises(ValueError, match="finetuned variant only"):
        format_prompt(tokenizer, "the cat", "base", chat_template_kwargs={"enable_thinking": False})


def test_chat_options_a_template_ignores_are_clear_errors() -> None:
    tokenizer = build_tokenizer(THINKING_WORDS, chat_template=THINKING_TEMPLATE)
    check_chat_options(tokenizer, {"enable_thinking": False}, "be brief")
    with pytest.raises(ValueError, match="never reads enable_thinkng.*reads.*enable_thinking"):
        check_chat_options(tokenizer, {"enable_thinkng": False})
    # The test template renders every turn as a user turn but reads no switch.
    plain = build_tokenizer()
    with pytest.raises(ValueError, match="never reads enable_thinking"):
        check_chat_options(plain, {"enable_thinking": False})
    user_only = build_tokenizer(
        chat_template=(
            "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    )
    with pytest.raises(ValueError, match="ignores the system turn"):
        check_chat_options(user_only, None, "be brief")


def test_chat_options_come_from_the_family_and_its_finetuned_entry() -> None:
    family = {
        "base": {"source": "hub"},
        "finetuned": {"source": "hub", "chat_template_kwargs": {"enable_thinking": False}},
        "chat_template_kwargs": {"enable_thinking": True, "style": "short"},
        "system_prompt": "be brief",
    }
    assert chat_options(family, "base") == {}
    assert chat_options(family, "finetuned") == {
        "chat_template_kwargs": {"enable_thinking": False, "style": "short"},
        "system_prompt": "be brief",
    }
    assert chat_options({"base": {}, "finetuned": {}}, "finetuned") == {}
    with pytest.raises(ValueError, match=r"families.qwen3.base sets system_prompt"):
        chat_options({"base": {"system_prompt": "x"}, "finetuned": {}}, "base", name="qwen3")
    with pytest.raises(ValueError, match="may not set 'add_generation_prompt'"):
        chat_options(
            {"base": {}, "finetuned": {"chat_template_kwargs": {"add_generation_prompt": False}}},
            "finetuned",
        )


def test_config_schema_accepts_chat_options_on_the_finetuned_side_only() -> None:
    import yaml

    from canopy.config import ConfigError, validate_config

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config" / "paper.yaml").read_text())
    checked = validate_config(config)
    assert checked["families"]["qwen3"]["finetuned"]["chat_template_kwargs"] == {
        "enable_thinking": False
    }
    assert chat_options(checked["families"]["qwen3"], "finetuned") == {
        "chat_template_kwargs": {"enable_thinking": False}
    }
    bad = yaml.safe_load((root / "config" / "paper.yaml").read_text())
    bad["families"]["qwen3"]["base"]["chat_template_kwargs"] = {"enable_thinking": False}
    with pytest.raises(ConfigError, match=r"families.qwen3.base.chat_template_kwargs"):
        validate_config(bad)
    bad = yaml.safe_load((root / "config" / "paper.yaml").read_text())
    bad["families"]["qwen3"]["system_prompt"] = ""
    with pytest.raises(ConfigError, match=r"families.qwen3.system_prompt"):
        validate_config(bad)


def test_prompt_formatting_errors_name_the_prompt() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        format_prompt(build_tokenizer(chat_template=None), "the cat", "finetuned", prompt_id="p7")
    with pytest.raises(ValueError, match="'p3' is empty"):
        format_prompt(build_tokenizer(), "   ", "base", prompt_id="p3")
    with pytest.raises(ValueError, match="unknown variant 'instruct'"):
        format_prompt(build_tokenizer(), "the cat", "instruct", prompt_id="p3")


def test_eos_ids_are_the_union_of_generation_config_config_and_tokenizer() -> None:
    tokenizer = build_tokenizer()
    model = build_llama(len(tokenizer), eos=[2, 6])
    model.generation_config.eos_token_id = [6, 9]
    assert eos_token_ids(model, tokenizer) == [2, 6, 9]


def test_eos_ids_missing_everywhere_is_an_error() -> None:
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    model = build_gpt2(len(tokenizer))
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        eos_token_ids(model, tokenizer)


# A template that closes each assistant turn with its own special token, as ChatML and Gemma do.
TURN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<assistant> {{ message['content'] }} <end_turn> "
    "{% else %}<user> {{ message['content'] }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_end_of_turn_is_the_special_token_that_closes_an_assistant_turn() -> None:
    tokenizer = build_tokenizer(chat_template=TURN_TEMPLATE)
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<end_turn>")]
    # No assistant turn rendered, or one closed by plain text: no end-of-turn token.
    assert end_of_turn_ids(build_tokenizer()) == []
    plain = TURN_TEMPLATE.replace("<end_turn>", "done")
    assert end_of_turn_ids(build_tokenizer(WORDS + ["done"], chat_template=plain)) == []


def test_context_length_reads_gpt2_and_llama_configs() -> None:
    assert context_length(build_gpt2(20, context=64)) == 64
    assert context_length(build_llama(20, context=96)) == 96


def test_visible_cuda_devices_agrees_with_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workflow's torch-free count says "none" exactly when torch sees no CUDA device, and an
    empty CUDA_VISIBLE_DEVICES hides every device from both."""
    import torch

    assert (visible_cuda_devices() > 0) == torch.cuda.is_available()
    for hidden in ("", "-1"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert visible_cuda_devices() == 0
