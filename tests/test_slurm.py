"""profiles/slurm: its settings, and real runs through a one-node Slurm started for the tests.

The cluster tests (marked slurm and slow) need root and apt-get: tests/support/slurm_cluster.py
installs Debian's slurm-wlm and munge when missing and starts private daemons in a scratch
directory. They run the workflow through a copy of profiles/slurm that differs only where a
one-node test cluster must: its partition, memory and threads that fit this machine, no retries
(a failure should show at once), squeue for job status (no accounting database here) and fast
status checks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from support.slurm_cluster import SlurmCluster, SlurmUnavailable, start_cluster
from support.workflow import REPO, SNAKEFILE, planned_jobs, workflow_rules

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
GPU_RULES = {"sample_rollouts", "sample_rollouts_chunk", "embed_rollouts"}
# Snakemake job ids are numbers, group jobs' are UUIDs.
SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+)")
# In a Slurm log, the job's rule is announced twice: as `rule x:` by the Snakemake of the batch
# script and as `localrule x:` by the Snakemake that srun starts and that really runs it.
RULE_RUN = re.compile(r"^localrule (\w+):$", re.MULTILINE)


def load_profile() -> dict:
    with PROFILE.open() as handle:
        return yaml.safe_load(handle)


# --------------------------------------------------------------------------- the profile itself


def test_profile_settings() -> None:
    profile = load_profile()
    assert profile["executor"] == "slurm"
    assert profile["retries"] == 2, "sampling resumes from its shards: let a killed job retry"
    assert profile["rerun-incomplete"] is True
    # Pre-empted jobs come back (sbatch --requeue) and resume from shards or checkpoints.
    assert profile["slurm-requeue"] is True
    assert profile["latency-wait"] >= 30
    assert profile["jobs"] >= 24, "the paper's 24 sampling jobs of one setting should run at once"
    defaults = profile["default-resources"]
    assert {"mem_mb", "runtime", "cpus_per_task"} <= set(defaults)
    # Local GPU limits belong to profiles/default: under Slurm a plain resource limit is global.
    assert "resources" not in profile
    assert profile["set-resource-scopes"] == {"gpu": "local"}


def test_profile_names_real_cluster_rules() -> None:
    """Every rule the profile sizes exists and runs on the cluster (resources of a local rule
    are ignored, so naming one is a mistake); the expensive rules are all sized."""
    rules = workflow_rules()
    profile = load_profile()
    named = set(profile["set-resources"]) | set(profile["set-threads"])
    for name in named:
        assert name in rules, f"profiles/slurm names rule {name!r}, which the workflow lacks"
        assert not rules[name]["local"], f"rule {name} is a local rule: Slurm settings do nothing"
    expensive = {
        "pretrain_base_model", "finetune_model", "sample_rollouts", "embed_rollouts",
        "fit_glmm", "glmm_diagnostics", "robustness_length_matched",
    }  # fmt: skip
    assert expensive <= set(profile["set-resources"])
    assert expensive <= set(profile["set-threads"])
    remote = {name for name, rule in rules.items() if not rule["local"] and name != "all"}
    unsized = remote - set(profile["set-resources"])
    assert not unsized, f"cluster rules without memory/runtime in profiles/slurm: {unsized}"


def test_profile_gpu_requests_come_from_the_rules() -> None:
    """The GPU rules compute `gpu` from their device; the profile must not also ask for gres
    (the plugin refuses both) nor pin gpu for every config."""
    profile = load_profile()
    for rule, resources in profile["set-resources"].items():
        assert "gres" not in resources, f"{rule}: use the rule's gpu resource, not gres"
        assert "gpu" not in resources, f"{rule}: gpu comes from the rule's device setting"
        assert "gpu_model" not in resources, f"{rule}: gpu_model turns CPU jobs into GPU jobs"
    assert GPU_RULES <= set(profile["set-resources"])


def test_profile_dry_run_of_default_config(tmp_path: Path) -> None:
    """Snakemake accepts every option and resource expression of the profile, and the GPU rules
    ask for a GPU under the default config (device auto)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TZ="UTC")
    command = [
        sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path),
        "--workflow-profile", str(PROFILE.parent), "-n",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"workflow specific profile {PROFILE.parent}" in output
    blocks = output.split("\nrule ")
    sampling = next(block for block in blocks if block.startswith("sample_rollouts:"))
    assert "mem_mb=48000" in sampling and "runtime=1440" in sampling and "gpu=1" in sampling
    glmm = next(block for block in blocks if block.startswith("fit_glmm:"))
    assert "mem_mb=16000" in glmm and "gpu" not in glmm


# --------------------------------------------------------------------------- a real cluster


def write_test_profile(directory: Path, cluster: SlurmCluster) -> Path:
    """profiles/slurm adapted to the one-node test cluster (see the module docstring)."""
    profile = load_profile()
    node_mem_per_cpu = cluster.memory_mib // cluster.cpus

    def fit(resources: dict) -> dict:
        fitted = dict(resources)
        if "mem_mb" in fitted:  # a share of the node, whatever the real cluster would get
            fitted["mem_mb"] = min(2000, node_mem_per_cpu)
        return fitted

    profile["default-resources"] = fit(profile["default-resources"])
    profile["default-resources"]["slurm_partition"] = cluster.partition
    profile["set-resources"] = {rule: fit(res) for rule, res in profile["set-resources"].items()}
    profile["set-threads"] = {
        rule: min(threads, cluster.cpus) for rule, threads in profile["set-threads"].items()
    }
    profile.update(
        {
            "retries": 0,
            "local-cores": 1,
            "slurm-status-command": "squeue",
            "slurm-no-account": True,
            "slurm-init-seconds-before-status-checks": 1,
            "seconds-between-status-checks": 1,
            "slurm-keep-successful-logs": True,
            "slurm-logdir": str(directory / "slurm_logs"),
        }
    )
    text = yaml.safe_dump(profile, sort_keys=False)
    assert not re.search(r"\b(gres|gpu_model)\b", text), "the test cluster has no GPUs"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(text)
    return directory


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("slurm")
    if len(str(root / "munge" / "munge.socket")) > 100:  # unix socket paths are short
        root = Path(os.environ.get("TMPDIR", "/tmp")) / f"canopy-slurm-{os.getpid()}"
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as reason:
        pytest.skip(f"no Slurm for the cluster tests: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()


def run_through_slurm(
    cluster: SlurmCluster,
    workdir: Path,
    profile: Path,
    *args: str,
    snakefile: Path = SNAKEFILE,
    timeout: float = 600,
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = dict(cluster.env, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TZ="UTC")
    command = [
        sys.executable, "-m", "snakemake", "-s", str(snakefile), "-d", str(workdir),
        "--workflow-profile", str(profile), *args,
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    return result, time.monotonic() - start


def finished_slurm_jobs(cluster: SlurmCluster) -> dict[str, tuple[str, str]]:
    """{Slurm job id: (state, partition)} of the jobs the controller still remembers (MinJobAge)."""
    result = cluster.run("squeue", "--states=all", "--noheader", "--format=%i|%T|%P")
    assert result.returncode == 0, result.stderr
    jobs = {}
    for line in result.stdout.split():
        job_id, state, partition = line.split("|")
        jobs[job_id] = (state, partition)
    return jobs


def assert_went_through_slurm(
    cluster: SlurmCluster, result: subprocess.CompletedProcess[str], log_dir: Path
) -> tuple[dict[str, str], dict[str, int]]:
    """Each submitted job completed in the test partition and left its Slurm log.

    Returns {snakemake job id: Slurm job id} and {rule: jobs of it run inside Slurm jobs}, read
    from the Slurm logs.
    """
    output = result.stdout + result.stderr
    submitted = dict(SUBMITTED.findall(output))
    assert submitted, f"no job was submitted to Slurm:\n{output[-3000:]}"
    known = finished_slurm_jobs(cluster)
    for slurm_id in submitted.values():
        assert known.get(slurm_id) == ("COMPLETED", cluster.partition), (slurm_id, known)
    logs = {path.stem: path for path in log_dir.rglob("*.log")}
    assert set(submitted.values()) <= set(logs), f"Slurm logs missing in {log_dir}: {logs}"
    ran_in_slurm: dict[str, int] = {}
    for slurm_id in submitted.values():
        for rule in RULE_RUN.findall(logs[slurm_id].read_text(errors="replace")):
            ran_in_slurm[rule] = ran_in_slurm.get(rule, 0) + 1
    return submitted, ran_in_slurm


HARNESS_SNAKEFILE = """
rule all:
    input: "a.txt", "b.txt"

rule a:
    output: "a.txt"
    threads: 2
    shell: "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK partition=$SLURM_JOB_PARTITION > {output}"

rule b:
    output: "b.txt"
    shell: "echo job=$SLURM_JOB_ID cpus=$SLURM_CPUS_PER_TASK partition=$SLURM_JOB_PARTITION > {output}"
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_two_jobs_run_through_slurm(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The harness alone: two jobs, each in its own Slurm allocation with the CPUs its threads
    ask for (independent jobs, so the test waits for one round of status checks only)."""
    snakefile = tmp_path / "Snakefile"
    snakefile.write_text(HARNESS_SNAKEFILE)
    profile = write_test_profile(tmp_path / "profile", slurm)
    result, seconds = run_through_slurm(slurm, tmp_path / "run", profile, snakefile=snakefile)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    submitted, ran = assert_went_through_slurm(slurm, result, tmp_path / "profile" / "slurm_logs")
    assert len(submitted) == 2 and ran == {"a": 1, "b": 1}  # `all` has no action: local
    a = (tmp_path / "run" / "a.txt").read_text().strip()
    b = (tmp_path / "run" / "b.txt").read_text().strip()
    assert re.fullmatch(rf"job=\d+ cpus={min(2, slurm.cpus)} partition={slurm.partition}", a), a
    assert re.fullmatch(rf"job=\d+ cpus=1 partition={slurm.partition}", b), b
    assert {a.split()[0][4:], b.split()[0][4:]} == set(submitted.values())
    print(f"two jobs through Slurm: {seconds:.1f} s")


def run_tiny_config(
    cluster: SlurmCluster,
    tmp_path: Path,
    targets: list[str],
    timeout: float = 600,
    overrides: tuple[Path, ...] = (),
) -> tuple[dict[str, int], dict[str, int], int, float]:
    """Run the tiny config (all of it, or `targets`) through the test cluster and check that every
    job of a cluster rule ran inside a Slurm allocation and none of a local rule did.
    Returns the planned cluster jobs per rule, the jobs run in Slurm per rule, the number of
    Slurm submissions and the run's wall time."""
    profile = write_test_profile(tmp_path / "profile", cluster)
    workdir = tmp_path / "run"
    # --configfile takes several values, later ones merged over earlier ones.
    args = [*targets, "--configfile", str(TINY_CONFIG), *map(str, overrides)]
    plan, _ = run_through_slurm(cluster, workdir, profile, "-n", *args)
    assert plan.returncode == 0, (plan.stdout + plan.stderr)[-4000:]
    rules = workflow_rules()
    planned = planned_jobs(plan.stdout + plan.stderr)
    remote = {rule: n for rule, n in planned.items() if rule != "all" and not rules[rule]["local"]}
    assert any(rules[rule]["local"] for rule in planned), f"no local rule planned: {planned}"

    result, seconds = run_through_slurm(cluster, workdir, profile, *args, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    submitted, ran = assert_went_through_slurm(cluster, result, tmp_path / "profile" / "slurm_logs")
    assert ran == remote, f"rules run inside Slurm {ran} != cluster rules planned {remote}"
    for target in targets:
        assert (workdir / target).stat().st_size > 0, target
    return remote, ran, len(submitted), seconds


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_config_runs_through_slurm(slurm: SlurmCluster, tmp_path: Path) -> None:
    """The whole tiny config: every cluster rule, the R statistics included, each job in its own
    Slurm allocation, the local rules beside. 4 min 20 s to 5 min 32 s on an idle 2-core machine;
    on one shared with other work (load 4-6) it took over ten minutes."""
    targets = [
        "results/headline.tsv",
        "results/stats/default/minilm/glmm/summary.json",
        "results/stats/default/minilm/paired_bootstrap.tsv",
        "results/figures/default/decomposition.pdf",
    ]
    remote, ran, submissions, seconds = run_tiny_config(slurm, tmp_path, [], timeout=3600)
    for target in targets:
        assert (tmp_path / "run" / target).stat().st_size > 0, target
    assert {"fit_glmm", "glmm_diagnostics", "sample_rollouts"} <= set(ran)
    assert submissions == sum(remote.values())  # one allocation per job: no grouping
    print(f"tiny config through Slurm: {seconds:.1f} s, {submissions} Slurm jobs")


@pytest.mark.slurm
@pytest.mark.slow
def test_chunked_sampling_runs_through_slurm(slurm: SlurmCluster, tmp_path: Path) -> None:
    """`sampling.default.chunks: 2`: each chunk of a task's prompts is its own Slurm job, and the
    local gather writes the task's table with every prompt's rollouts."""
    import pyarrow.parquet as pq

    override = tmp_path / "chunks.yaml"
    override.write_text("sampling:\n  default:\n    chunks: 2\n")
    target = "results/rollouts/default/tinyllama/finetuned/math.parquet"
    _, ran, _, seconds = run_tiny_config(slurm, tmp_path, [target], overrides=(override,))
    assert ran.get("sample_rollouts_chunk") == 2 and "sample_rollouts" not in ran
    assert "gather_rollouts" not in ran  # a local rule
    table = pq.read_table(tmp_path / "run" / target).to_pandas()
    assert table.groupby("prompt_id").size().tolist() == [6] * 4
    print(f"chunked sampling through Slurm: {seconds:.1f} s")
