"""The paper's experiment end to end against a hub on 127.0.0.1.

A scaled-down copy of config/paper.yaml (the same keys and repository ids; every family, task and
embedder from the hub) runs through the real workflow against olah serving git repositories the
test builds: tiny random models of the three architectures with their chat templates, a tiny
sentence-transformers embedder, parquet prompt sets with the paper's field names. Only the
fetching jobs may talk to the hub, and the checks after the run are the ones users meet: the lock
file names the served commits, a second run plans nothing, a branch that moved is reported, a
gated repository asks for HF_TOKEN, and a fetch killed midway leaves nothing that looks complete.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from canopy.hub import is_commit
from support.hub_repos import BUILDERS, build_dataset, build_embedder, build_nli
from support.hub_server import HubServer, HubUnavailable
from support.workflow import REPO, SNAKEFILE, planned_jobs

pytestmark = pytest.mark.slow

PAPER = REPO / "config" / "paper.yaml"
# Gated on the hub as they are in reality: their fetches need the token.
GATED = ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "google/gemma-3-12b-pt",
         "google/gemma-3-12b-it")  # fmt: skip
STORIES = "canopy-test/macgyver"  # MacGyver is no hub data set; a served copy stands in for it
DATASETS = {"bigcode/bigcodebench": "bigcodebench", "openai/gsm8k": "gsm8k",
            "Rowan/hellaswag": "hellaswag", STORIES: "macgyver"}  # fmt: skip


def paper_config_for_tests() -> dict:
    """config/paper.yaml scaled down: two prompts per task, three short rollouts on the CPU, the
    regression reduced to what a small panel carries. Keys and repository ids stay the paper's."""
    config = copy.deepcopy(yaml.safe_load(PAPER.read_text()))
    stories = config["tasks"]["stories"]
    config["tasks"]["stories"] = {
        "source": "hub",
        "dataset": STORIES,
        "revision": "main",
        "split": "train",
        "field": stories["field"],
        "template": stories["template"],
        "n_prompts": 2,
    }
    for task in config["tasks"].values():
        assert task["source"] == "hub"
        task["n_prompts"] = 2
    for family in config["families"].values():
        assert family["base"]["source"] == family["finetuned"]["source"] == "hub"
    for settings in config["sampling"].values():
        # 2 chunks of the 2 prompts: the paper's chunked sampling path, one prompt per job.
        settings.update(rollouts=3, max_new_tokens=24, device="cpu", dtype="float32", chunks=2)
    for settings in config["embedders"].values():
        settings.update(device="cpu", batch_size=8, max_length=128)
    config["diversity"]["semantic_entropy"].update(device="cpu", batch_size=16, max_length=128)
    config["metrics"]["bootstrap"]["resamples"] = 100
    config["stats"].update(
        formula="D ~ R_sc * variant + invN_sc + task + (1 | prompt_uid)",
        dispersion="~ variant",
        bootstrap=20,
        robustness={"length_bins": 2, "min_matched": 2},
    )
    return config


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The served repositories of every model, data set and embedder the config names, and
    {repo id: commit of main}."""
    root = tmp_path_factory.mktemp("hub")
    server = HubServer(root)
    config = paper_config_for_tests()
    build = root / "build"
    commits: dict[str, str] = {}
    for family, variants in config["families"].items():
        for variant, spec in variants.items():
            directory = build / spec["id"]
            BUILDERS[family](directory, instruct=variant == "finetuned")
            commits[spec["id"]] = server.commit(spec["id"], {".": directory}, message="weights")
    for spec in config["embedders"].values():
        directory = build / spec["model"]
        build_embedder(directory)
        commits[spec["model"]] = server.commit(spec["model"], {".": directory})
    nli = config["diversity"]["semantic_entropy"]["model"]
    build_nli(build / nli)
    commits[nli] = server.commit(nli, {".": build / nli})
    for spec in config["tasks"].values():
        directory = build / spec["dataset"]
        build_dataset(directory, DATASETS[spec["dataset"]])
        commits[spec["dataset"]] = server.commit(
            spec["dataset"], {".": directory}, repo_type="dataset"
        )
    # Where config/paper.yaml pins a commit of the real hub, pin the served repository's instead.
    for task in config["tasks"].values():
        if is_commit(task["revision"]):
            task["revision"] = commits[task["dataset"]]
    server.gated.update(GATED)
    try:
        server.start()
    except HubUnavailable as error:
        pytest.fail(f"the hub-protocol test server is missing: {error}")
    yield server, config, commits
    server.stop()


def run(
    hub: HubServer, workdir: Path, *args: str, token: bool = True, timeout: float = 1500
) -> subprocess.CompletedProcess[str]:
    """snakemake on this repository with the hub reachable (and HF_TOKEN set unless not token)."""
    env = hub.env(TZ="UTC", **({"HF_TOKEN": hub.token} if token else {}))
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def write_config(workdir: Path, config: dict) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "paper-test.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


FETCH_RULES = ("download_model", "download_embedder", "download_classifier", "prepare_prompts")


# The end-to-end run keeps two of the four tasks (completion is the regression's reference): the
# analysis of the other two is the same code, and each job costs seconds of start-up on 2 cores.
# All four data sets are fetched and prepared by test_every_paper_task_is_fetched_and_prepared.
RUN_TASKS = ("math", "completion")


def test_every_paper_task_is_fetched_and_prepared(hub, tmp_path: Path) -> None:
    server, config, commits = hub
    configfile = write_config(tmp_path, config)
    targets = [f"resources/prompts/{task}.jsonl" for task in config["tasks"]]
    # Targets go before --configfile, which takes every value after it.
    result = run(server, tmp_path, *targets, "--cores", "2", "--configfile", configfile)
    assert result.returncode == 0, output(result)[-6000:]
    for task, spec in config["tasks"].items():
        prompts = (tmp_path / f"resources/prompts/{task}.jsonl").read_text().splitlines()
        assert len(prompts) == spec["n_prompts"]
        record = json.loads((tmp_path / f"resources/prompts/{task}.source.json").read_text())
        assert record["repo_id"] == spec["dataset"] and record["commit"] == commits[spec["dataset"]]
    coding = [json.loads(line) for line in (tmp_path / "resources/prompts/coding.jsonl").open()]
    assert [p["prompt_id"] for p in coding] == ["BigCodeBench/0", "BigCodeBench/1"]
    stories = [json.loads(line) for line in (tmp_path / "resources/prompts/stories.jsonl").open()]
    assert stories[0]["prompt"].startswith("Come up with an original and creative solution")


@pytest.fixture(scope="module")
def paper_run(hub, tmp_path_factory: pytest.TempPathFactory):
    """The whole DAG to the report: first the fetching jobs, then everything else while the
    test counts the requests that reach the hub."""
    server, full_config, commits = hub
    config = copy.deepcopy(full_config)
    config["tasks"] = {task: config["tasks"][task] for task in RUN_TASKS}
    commits = {
        repo: commit
        for repo, commit in commits.items()
        if repo not in {spec["dataset"] for spec in full_config["tasks"].values()}
        or repo in {spec["dataset"] for spec in config["tasks"].values()}
    }
    workdir = tmp_path_factory.mktemp("paper")
    configfile = write_config(workdir, config)
    started = time.monotonic()
    fetch = run(
        server, workdir, "--cores", "2", "--configfile", configfile, "--until", *FETCH_RULES
    )
    assert fetch.returncode == 0, output(fetch)[-8000:]
    requests_after_fetch = len(server.requests)
    assert requests_after_fetch > 0
    analysis = run(server, workdir, "--cores", "2", "--configfile", configfile)
    assert analysis.returncode == 0, output(analysis)[-8000:]
    report = run(server, workdir, "--configfile", configfile, "--report", "results/report.html")
    assert report.returncode == 0, output(report)[-4000:]
    seconds = time.monotonic() - started
    print(f"paper path against the test hub: {seconds:.0f} s")
    return server, config, commits, workdir, configfile, server.requests[requests_after_fetch:]


def test_only_the_fetching_jobs_reach_the_hub(paper_run) -> None:
    *_, later_requests = paper_run
    # The hub stayed up and HF_ENDPOINT pointed at it: no job after the fetches asked it anything.
    assert later_requests == []


def test_the_whole_dag_runs_to_the_report(paper_run) -> None:
    server, config, commits, workdir, configfile, _ = paper_run
    results = workdir / "results"
    assert (results / "report.html").stat().st_size > 10_000
    assert (results / "headline.tsv").stat().st_size > 0
    entropy = pd.read_parquet(results / "semantic_entropy/default/gemma3/finetuned/math.parquet")
    assert entropy["semantic_entropy"].notna().all()  # the fetched NLI model clustered them
    for family in config["families"]:
        for variant in ("base", "finetuned"):
            for task in config["tasks"]:
                path = results / f"rollouts/default/{family}/{variant}/{task}.parquet"
                assert path.stat().st_size > 0, path
    assert list((results / "figures").rglob("*.png"))


def test_the_instruct_qwen3_is_sampled_with_thinking_off(paper_run) -> None:
    """config/paper.yaml switches Qwen3's thinking mode off; the prompts the fine-tuned Qwen3 was
    sampled from are its chat template's with that switch, not the template's default."""
    from transformers import AutoTokenizer

    from canopy.prompts import read_prompts
    from canopy.modeling import format_prompt

    server, config, commits, workdir, *_ = paper_run
    options = config["families"]["qwen3"]["finetuned"]["chat_template_kwargs"]
    assert options == {"enable_thinking": False}
    tokenizer = AutoTokenizer.from_pretrained(workdir / "resources/models/qwen3/finetuned")
    rollouts = pd.read_parquet(workdir / "results/rollouts/default/qwen3/finetuned/math.parquet")
    for prompt in read_prompts(workdir / "resources/prompts/math.jsonl"):
        off = format_prompt(tokenizer, prompt.prompt, "finetuned", chat_template_kwargs=options)
        on = format_prompt(tokenizer, prompt.prompt, "finetuned")
        assert tokenizer.decode(off).endswith("<think> </think>")  # the empty trace
        lengths = set(rollouts.loc[rollouts["prompt_id"] == prompt.prompt_id, "prompt_tokens"])
        assert lengths == {len(off)} != {len(on)}


def test_the_lock_file_names_the_served_commits(paper_run) -> None:
    server, config, commits, workdir, *_ = paper_run
    lock = yaml.safe_load((workdir / "results/provenance/lock.yaml").read_text())
    locked = {entry["repository"]: entry["commit"] for entry in lock["models"]}
    locked |= {entry["repository"]: entry["commit"] for entry in lock["embedders"]}
    locked |= {entry["repository"]: entry["commit"] for entry in lock["classifiers"]}
    locked |= {entry["repo_id"]: entry["commit"] for entry in lock["prompts"]}
    assert locked == commits
    for entry in lock["models"] + lock["embedders"] + lock["classifiers"] + lock["prompts"]:
        pinned = is_commit(entry["revision"])
        assert entry["revision"] == (entry["commit"] if pinned else "main")
    software = lock["software"]
    for name in ("torch", "transformers", "datasets", "sentence-transformers", "R", "glmmTMB"):
        assert software[name], name
    table = (workdir / "results/provenance/lock.tsv").read_text()
    assert all(commit in table for commit in commits.values())


def test_a_second_run_plans_nothing(paper_run) -> None:
    server, config, commits, workdir, configfile, _ = paper_run
    again = run(server, workdir, "-n", "--configfile", configfile)
    assert again.returncode == 0, output(again)[-4000:]
    assert planned_jobs(again.stdout) == {}, again.stdout[-3000:]


def test_a_moved_branch_is_reported_and_a_new_pin_refetches_only_what_it_names(paper_run) -> None:
    server, config, commits, workdir, configfile, _ = paper_run
    moved_id = config["families"]["qwen3"]["finetuned"]["id"]
    new_commit = server.commit(moved_id, {"README.md": "a newer upload\n"})
    # The run keeps the fetched copy: nothing is planned behind the user's back.
    plan = run(server, workdir, "-n", "--configfile", configfile)
    assert planned_jobs(plan.stdout) == {}, plan.stdout[-3000:]
    check = run(server, workdir, "check_hub_revisions", "--cores", "1", "--configfile", configfile)
    assert check.returncode != 0
    message = output(check)
    assert f"{moved_id}@main: fetched {commits[moved_id]}, now {new_commit}" in message, message[
        -4000:
    ]
    assert "set each revision in the config to the new commit SHA" in message
    # Pinning the new commit refetches that model and reruns what was computed from it, only.
    pinned = copy.deepcopy(config)
    pinned["families"]["qwen3"]["finetuned"]["revision"] = new_commit
    plan = run(server, workdir, "-n", "--configfile", write_config(workdir / "pinned", pinned))
    jobs = planned_jobs(plan.stdout)
    assert jobs["download_model"] == 1, jobs
    assert jobs["sample_rollouts_chunk"] == 2 * jobs["gather_rollouts"] == 2 * len(config["tasks"])
    assert "download_embedder" not in jobs and "prepare_prompts" not in jobs


def test_a_gated_repository_asks_for_the_token(hub, tmp_path: Path) -> None:
    server, config, commits = hub
    configfile = write_config(tmp_path, config)
    result = run(
        server, tmp_path, "resources/models/llama31/base", "--cores", "1",
        "--configfile", configfile, token=False,
    )  # fmt: skip
    assert result.returncode != 0
    log = (tmp_path / "logs/models/llama31/base.download.log").read_text()
    assert "meta-llama/Llama-3.1-8B at revision 'main' is gated" in log, log[-3000:]
    assert "HF_TOKEN" in log and "accept its licence" in log
    assert not (tmp_path / "resources/models/llama31/base").exists()


def test_a_fetch_killed_midway_leaves_nothing_that_looks_complete(hub, tmp_path: Path) -> None:
    server, config, commits = hub
    configfile = write_config(tmp_path, config)
    target = tmp_path / "resources/models/gemma3/finetuned"
    partial = target.with_name(".finetuned.partial")
    server.throttle["model.safetensors"] = 0.4  # seconds per 64 KiB: the weights take seconds
    env = server.env(TZ="UTC", HF_TOKEN=server.token)
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path),
               str(target.relative_to(tmp_path)), "--cores", "1", "--configfile", configfile]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(partial.rglob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(partial.rglob("*.json")), "the fetch never started"
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        server.throttle.clear()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # The model's directory does not exist: no job can load a half-fetched model.
    assert not target.exists()
    assert partial.is_dir()
    # As after any killed Snakemake: release its lock, then run again.
    unlocked = run(server, tmp_path, "--unlock", "--configfile", configfile)
    assert unlocked.returncode == 0, output(unlocked)[-3000:]
    resumed = run(server, tmp_path, str(target.relative_to(tmp_path)), "--cores", "1",
                  "--configfile", configfile)  # fmt: skip
    assert resumed.returncode == 0, output(resumed)[-4000:]
    served = server.repo_dir(config["families"]["gemma3"]["finetuned"]["id"]) / "model.safetensors"
    assert (target / "model.safetensors").read_bytes() == served.read_bytes()
    assert not partial.exists()
