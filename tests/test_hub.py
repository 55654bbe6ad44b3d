"""canopy.hub and canopy.provenance against a hub on 127.0.0.1 (olah behind a gate, see
tests/support/hub_server.py): fetches at resolved commits with their records, the messages of a
gated, a missing and an unreachable repository, resumption, moved branches, custom-code embedders,
and the network policy of the workflow's jobs.

Each check runs in a fresh Python process: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE
once, when it is first imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support.hub_repos import build_qwen3
from support.hub_server import HubServer, HubUnavailable
from support.workflow import REPO

from canopy.sources.record import RECORD_FILE

SRC = REPO / "src"
MODEL = "canopy-test/tiny-qwen3"
GATED = "canopy-test/gated-model"
CUSTOM = "canopy-test/custom-code-embedder"
DATASET = "canopy-test/questions"

CONFIG_CODE = """from transformers import PretrainedConfig


class CanopyTinyConfig(PretrainedConfig):
    model_type = "canopy_tiny"

    def __init__(self, vocab_size=128, hidden_size=16, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
"""
MODEL_CODE = """from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput
import torch

from .configuration_canopy import CanopyTinyConfig


class CanopyTinyModel(PreTrainedModel):
    config_class = CanopyTinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.embed(input_ids))
"""


def build_custom_code_embedder(out_dir: Path) -> None:
    """A sentence-transformers model whose encoder is code shipped in the repository (auto_map),
    loadable only with trust_remote_code, as some hub embedders are."""
    script = f"""
        import shutil, sys, torch
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "tests")!r})
        from support.hub_repos import build_tokenizer
        from transformers import AutoConfig, AutoModel
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
        encoder = Path({str(out_dir)!r} + ".encoder")
        encoder.mkdir(parents=True)
        (encoder / "configuration_canopy.py").write_text({CONFIG_CODE!r})
        (encoder / "modeling_canopy.py").write_text({MODEL_CODE!r})
        tokenizer = build_tokenizer(encoder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], bos="[CLS]",
                                    eos="[SEP]", pad="[PAD]", unk="[UNK]")
        sys.path.insert(0, str(encoder))
        import configuration_canopy
        config = configuration_canopy.CanopyTinyConfig(
            vocab_size=len(tokenizer), hidden_size=16,
            auto_map={{"AutoConfig": "configuration_canopy.CanopyTinyConfig",
                       "AutoModel": "modeling_canopy.CanopyTinyModel"}})
        config.save_pretrained(encoder)
        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(encoder, trust_remote_code=True),
                              trust_remote_code=True).save_pretrained(encoder)
        remote = {{"trust_remote_code": True}}
        module = Transformer(str(encoder), max_seq_length=64, model_kwargs=remote,
                             config_kwargs=remote, processor_kwargs=remote)
        SentenceTransformer(modules=[module, Pooling(embedding_dimension=16, pooling_mode="mean"),
                                     Normalize()]).save({str(out_dir)!r})
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root)
    build_qwen3(root / "build" / "qwen", instruct=True)
    commits = {MODEL: server.commit(MODEL, {".": root / "build" / "qwen"})}
    commits[GATED] = server.commit(GATED, {".": root / "build" / "qwen"})
    build_custom_code_embedder(root / "build" / "custom")
    commits[CUSTOM] = server.commit(CUSTOM, {".": root / "build" / "custom"})
    import pandas as pd

    frame = pd.DataFrame({"question": ["how many apples", "what is the sum"], "id": [7, 8]})
    (root / "build" / "questions" / "data").mkdir(parents=True)
    frame.to_parquet(root / "build" / "questions" / "data" / "train-0.parquet")
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-0.parquet\n---\n"  # fmt: skip
    (root / "build" / "questions" / "README.md").write_text(card)
    commits[DATASET] = server.commit(
        DATASET, {".": root / "build" / "questions"}, repo_type="dataset"
    )
    server.gated.add(GATED)
    try:
        server.start()
    except HubUnavailable as error:
        pytest.fail(f"the hub-protocol test server is missing: {error}")
    yield server, commits
    server.stop()


def python(
    hub: HubServer, body: str, *, token: bool = False, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a fresh interpreter that talks to the test hub."""
    code = f"import sys\nsys.path.insert(0, {str(SRC)!r})\n" + textwrap.dedent(body)
    environment = hub.env(**({"HF_TOKEN": hub.token} if token else {}), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=300)  # fmt: skip


def test_a_model_is_fetched_at_the_commit_its_branch_resolves_to(hub, tmp_path: Path) -> None:
    server, commits = hub
    result = python(server, f"""
        from canopy.hub import download_model
        record = download_model({MODEL!r}, "main", {str(tmp_path / "m")!r})
        print(record.commit)
    """)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == commits[MODEL]
    record = json.loads((tmp_path / "m" / RECORD_FILE).read_text())
    assert record["source"] == "hub" and record["kind"] == "model"
    assert record["repo_id"] == MODEL and record["revision"] == "main"
    assert record["commit"] == commits[MODEL] and record["endpoint"] == server.endpoint
    assert "model.safetensors" in record["files"] and "tokenizer_config.json" in record["files"]
    served = (server.repo_dir(MODEL) / "model.safetensors").read_bytes()
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == served
    assert not list(tmp_path.glob(".*partial"))


def test_a_gated_repository_says_how_to_get_access(hub, tmp_path: Path) -> None:
    server, commits = hub
    body = f"""
        from canopy.hub import download_model
        download_model({GATED!r}, "main", {str(tmp_path / "g")!r}, config_key="families.x.base")
    """
    denied = python(server, body)
    assert denied.returncode != 0
    assert f"HubFetchError: repository {GATED} at revision 'main' is gated" in denied.stderr
    assert "accept its licence" in denied.stderr and "HF_TOKEN" in denied.stderr
    assert not (tmp_path / "g").exists()
    allowed = python(server, body, token=True)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert (tmp_path / "g" / "model.safetensors").is_file()


def test_a_missing_repository_names_the_key_and_the_way_out(hub, tmp_path: Path) -> None:
    server, _ = hub
    result = python(server, f"""
        from canopy.hub import download_model
        download_model("canopy-test/no-such-model", "main", {str(tmp_path / "x")!r},
                       config_key="families.qwen3.base")
    """)  # fmt: skip
    assert result.returncode != 0
    message = result.stderr
    assert "canopy-test/no-such-model at revision 'main' was not found" in message
    assert "private or gated and HF_TOKEN is unset" in message
    assert "families.qwen3.base" in message and "source: local, path: <dir>" in message


def test_an_unreachable_hub_says_so_and_gives_the_offline_way_out(hub, tmp_path: Path) -> None:
    server, _ = hub
    result = python(server, f"""
        from canopy.hub import download_model
        download_model({MODEL!r}, "main", {str(tmp_path / "x")!r})
    """, HF_ENDPOINT="http://127.0.0.1:9")  # fmt: skip
    assert result.returncode != 0
    assert "the hub could not be reached" in result.stderr
    assert f"hf download {MODEL} --revision main" in result.stderr


def test_a_partial_fetch_of_another_commit_is_discarded(hub, tmp_path: Path) -> None:
    server, commits = hub
    partial = tmp_path / ".m.partial"
    partial.mkdir()
    (partial / ".canopy_commit").write_text("0" * 40 + "\n")
    (partial / "stale.safetensors").write_bytes(b"from another commit")
    result = python(server, f"""
        from canopy.hub import download_model
        download_model({MODEL!r}, {commits[MODEL]!r}, {str(tmp_path / "m")!r})
    """)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "m" / "stale.safetensors").exists()
    assert json.loads((tmp_path / "m" / RECORD_FILE).read_text())["commit"] == commits[MODEL]


def test_a_custom_code_embedder_runs_from_its_fetched_directory_offline(
    hub, tmp_path: Path
) -> None:
    server, commits = hub
    fetched = python(server, f"""
        from canopy.hub import download_embedder
        print(download_embedder({CUSTOM!r}, "main", {str(tmp_path / "e")!r}).commit)
    """)  # fmt: skip
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    assert (tmp_path / "e" / "modeling_canopy.py").is_file()
    # Loaded as the embedding job does: hub switched off, only the fetched directory.
    loaded = python(server, f"""
        from canopy.diversity import EmbedderSettings, load_embedder, embed_texts
        settings = EmbedderSettings(model={CUSTOM!r}, revision="main", trust_remote_code=True,
                                    prefix="query: ", max_length=32, device="cpu")
        model = load_embedder(settings, name="custom", directory={str(tmp_path / "e")!r})
        vectors = embed_texts(model, ["the man walks", "a jar lid"], prefix=settings.prefix)
        print(vectors.shape)
    """, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.strip().endswith("(2, 16)")


def test_a_moved_branch_is_found_and_a_pinned_commit_is_not_asked_about(
    hub, tmp_path: Path
) -> None:
    server, commits = hub
    result = python(server, f"""
        from canopy.hub import download_model, moved_revisions, HubFetch
        from dataclasses import replace
        branch = download_model({MODEL!r}, "main", {str(tmp_path / "m")!r})
        pinned = replace(branch, revision=branch.commit)
        print(len(moved_revisions([branch, pinned])))
    """)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "0"
    new = server.commit(MODEL, {"notes.txt": "moved\n"})
    checked = python(server, f"""
        from canopy.hub import read_fetch_record
        from canopy.provenance import check_revisions
        check_revisions([read_fetch_record({str(tmp_path / "m")!r})])
    """)  # fmt: skip
    assert checked.returncode != 0
    assert f"{MODEL}@main: fetched {commits[MODEL]}, now {new}" in checked.stderr
    commits[MODEL] = new


def test_a_hub_prompt_set_records_the_commit_it_was_read_at(hub, tmp_path: Path) -> None:
    server, commits = hub
    result = python(server, f"""
        import json
        from canopy.prompts import prepare_prompts, prompt_source_record
        spec = {{"source": "hub", "dataset": {DATASET!r}, "revision": "main", "split": "train",
                 "field": "question", "id_field": "id", "n_prompts": 2}}
        record = prompt_source_record("math", spec)
        prompts = prepare_prompts("math", {{**spec, "revision": record["commit"]}}, seed=1)
        print(json.dumps([record["commit"], [p.prompt_id for p in prompts]]))
    """)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    commit, ids = json.loads(result.stdout.splitlines()[-1])
    assert commit == commits[DATASET] and ids == ["7", "8"]


JOB = """
    import sys, types
    sys.path.insert(0, {scripts!r})
    from script_setup import setup
    setup(types.SimpleNamespace(log=[], threads=1, rule="some_rule"), network={network})
    from canopy.hub import resolve_revision
    print(resolve_revision({model!r}, "main"))
"""


@pytest.mark.parametrize("network", [False, True])
def test_only_a_fetching_job_can_reach_the_hub(hub, network: bool) -> None:
    server, commits = hub
    scripts = str(REPO / "workflow" / "scripts")
    # The user's environment says online; a job that is not a fetch is offline all the same.
    result = python(server, JOB.format(scripts=scripts, network=network, model=MODEL),
                    HF_HUB_OFFLINE="0")  # fmt: skip
    if network:
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.split()[-1] == commits[MODEL]
    else:
        assert result.returncode != 0
        assert "the hub is switched off here (HF_HUB_OFFLINE)" in result.stderr


def test_a_fetch_record_that_is_missing_is_no_model(tmp_path: Path) -> None:
    from canopy.hub import read_fetch_record

    assert read_fetch_record(tmp_path) is None
    shutil.rmtree(tmp_path)
    assert read_fetch_record(tmp_path) is None


def test_a_directory_fetched_before_the_one_record_keeps_its_record(tmp_path: Path) -> None:
    """A model fetched before every made directory held canopy_source.json has only its
    canopy_fetch.json: it is read as the same record, so the model is not fetched again."""
    from canopy.hub import FETCH_RECORD, read_fetch_record
    from canopy.provenance import model_entry

    old = {
        "kind": "model",
        "repo_id": "org/m",
        "repo_type": "model",
        "revision": "main",
        "commit": "c" * 40,
        "endpoint": "https://hub.example",
        "fetched_at": "2026-01-01T00:00:00+00:00",
        "files": ["config.json"],
    }
    (tmp_path / FETCH_RECORD).write_text(json.dumps(old))
    record = read_fetch_record(tmp_path)
    assert record is not None and record.commit == "c" * 40 and record.files == ("config.json",)
    entry = model_entry("fam", "base", {"source": "hub"}, tmp_path)
    assert entry["commit"] == "c" * 40 and entry["pinned"] is False
    # The one record wins over an old file left beside it.
    (tmp_path / RECORD_FILE).write_text(json.dumps({"source": "hub", **old, "commit": "d" * 40}))
    assert read_fetch_record(tmp_path).commit == "d" * 40
