"""The workflow as users run it: real Snakemake runs of small configs, offline, on the CPU."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from support.workflow import REPO, planned_jobs, snakemake

TINY = REPO / "tests" / "configs" / "tiny.yaml"
TINY_SWEEPS = REPO / "tests" / "configs" / "tiny_sweeps.yaml"


def test_paper_config_builds_the_full_dag_offline(tmp_path: Path) -> None:
    paper = str(REPO / "config" / "paper.yaml")
    # MacGyver is read from a local jsonl the user converts (docs/data_sources.md): without it the
    # plan stops before any job, naming the file and the rule.
    missing = snakemake(tmp_path, "-n", "--configfile", paper, check=False)
    assert missing.returncode != 0
    assert "resources/data/macgyver.jsonl" in missing.stdout + missing.stderr
    assert "prepare_prompts" in missing.stdout + missing.stderr
    macgyver = tmp_path / "resources" / "data" / "macgyver.jsonl"
    macgyver.parent.mkdir(parents=True)
    macgyver.write_text('{"Problem": "Open a jar without a grip."}\n')
    result = snakemake(tmp_path, "-n", "--configfile", paper)
    jobs = planned_jobs(result.stdout)
    # 3 families x 2 variants x 4 tasks, each sampled in 4 chunks (one GPU job each), gathered
    # and scored once; one embedding job per model.
    assert jobs["gather_rollouts"] >= 24 and "sample_rollouts" not in jobs
    assert jobs["sample_rollouts_chunk"] == 4 * jobs["gather_rollouts"]
    assert jobs["gather_rollouts"] == jobs["prompt_metrics"] == 4 * jobs["embed_rollouts"]
    # diversity.semantic_entropy names an NLI model: one clustering job per rollout table.
    assert jobs["semantic_entropy"] == jobs["gather_rollouts"]
    assert jobs["download_model"] == 6
    assert jobs["download_embedder"] == 1  # the paper's embedder is fetched like a model
    assert jobs["lock"] == 1
    assert jobs["fit_glmm"] == 1
    assert "pretrain_base_model" not in jobs


def test_ablations_plan_every_sweep_point_offline(tmp_path: Path) -> None:
    """`--configfile config/paper.yaml config/ablations.yaml`: Snakemake merges the two, and every
    sweep point (3 sampled settings and a reward-model filter, 4 embedders, 2 few-shot tasks)
    enters the plan as wildcard values."""
    macgyver = tmp_path / "resources" / "data" / "macgyver.jsonl"
    macgyver.parent.mkdir(parents=True)
    macgyver.write_text('{"Problem": "Open a jar without a grip."}\n')
    configs = [str(REPO / "config" / "paper.yaml"), str(REPO / "config" / "ablations.yaml")]
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--configfile", *configs).stdout)
    models, tasks = 6, 6
    assert jobs["prepare_prompts"] == tasks
    # default (in 4 chunks each, gathered), topk1000, topk5000
    assert jobs["sample_rollouts_chunk"] == 4 * jobs["gather_rollouts"] == 4 * models * tasks
    assert jobs["sample_rollouts"] == 2 * models * tasks
    assert jobs["filter_rollouts"] == models * tasks  # rm70, from default
    assert jobs["prompt_metrics"] == 4 * models * tasks
    # one embedding job per (sampling point, embedder, model) covers every task
    assert jobs["embed_rollouts"] == 4 * 4 * models
    assert jobs["diversity"] == 4 * 4 * models * tasks
    assert jobs["download_embedder"] == 4 and jobs["download_classifier"] == 2  # + NLI, reward
    assert jobs["fit_glmm"] == jobs["panel"] == 16
    # sweeps.checks (default main): diagnostics, robustness refits and residuals for the main pair
    for rule in ("glmm_diagnostics", "robustness_lmm", "robustness_length_matched"):
        assert jobs[rule] == 1, rule
    assert jobs["figure_residuals"] == 1 and jobs["figure_slopes"] == 16
    assert jobs["ablation_summary"] == jobs["figure_forest"] == 1
    assert jobs["figure_rho"] == 4


DEFAULT_SWEEPS = REPO / "config" / "sweeps.yaml"


def test_default_config_plans_every_stage(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "-n")
    jobs = planned_jobs(result.stdout)
    for rule in (
        "prepare_prompts",
        "pretrain_base_model",
        "finetune_model",
        "sample_rollouts",
        "prompt_metrics",
        "embed_rollouts",
        "diversity",
        "panel",
        "fit_glmm",
        "glmm_diagnostics",
        "headline",
    ):
        assert jobs.get(rule, 0) >= 1, rule
    # The main setting alone: 2 families x 2 variants x 4 tasks, one embedding job per model, one
    # regression, and an ablation summary of that one row.
    models = 2 * 2
    assert jobs["sample_rollouts"] == jobs["prompt_metrics"] == jobs["diversity"] == models * 4
    assert jobs["embed_rollouts"] == models
    assert jobs["fit_glmm"] == jobs["panel"] == 1
    assert jobs["ablation_summary"] == jobs["figure_forest"] == 1


def test_the_defaults_sweep_points_add_only_what_depends_on_them(recorded_default: Path) -> None:
    """config/sweeps.yaml over a finished run of config.yaml: the main setting's rollouts and
    metrics of the four tasks are kept; what runs is the one-shot task for every model, the sweep
    points on sweeps.tasks, and what reads them (the main setting's embedding job of each model
    covers every task, so it and its diversity scores are redone with the new task)."""
    configs = [str(REPO / "config.yaml"), str(DEFAULT_SWEEPS)]
    jobs = planned_jobs(snakemake(recorded_default, "-n", "--configfile", *configs).stdout)
    models = 2 * 2
    # math_1shot for every model at the main setting, topk20 and minp10 on sweeps.tasks (math,
    # completion)
    assert jobs["sample_rollouts"] == jobs["prompt_metrics"] == models + 2 * models * 2
    # the main embedding job of each model gains math_1shot; one job per model and sweep pair
    assert jobs["embed_rollouts"] == 4 * models
    assert jobs["diversity"] == models * 5 + 3 * models * 2
    assert jobs["fit_glmm"] == jobs["panel"] == 4
    assert jobs["ablation_summary"] == jobs["figure_forest"] == 1
    assert jobs["figure_slopes"] == 4
    # Only the main pair is checked (sweeps.checks: main): a sweep point's row needs its fit only.
    assert jobs["glmm_diagnostics"] == jobs["robustness_lmm"] == jobs["figure_residuals"] == 1
    assert "pretrain_base_model" not in jobs and "finetune_model" not in jobs


def test_sweeps_checks_every_pair_checks_each_pair(tmp_path: Path) -> None:
    overlay = yaml.safe_load(DEFAULT_SWEEPS.read_text())
    overlay["sweeps"]["checks"] = "every_pair"
    (tmp_path / "every_pair.yaml").write_text(yaml.safe_dump(overlay))
    configs = [str(REPO / "config.yaml"), str(tmp_path / "every_pair.yaml")]
    jobs = planned_jobs(snakemake(tmp_path, "-n", "--configfile", *configs).stdout)
    for rule in ("glmm_diagnostics", "robustness_lmm", "robustness_fixed_effects"):
        assert jobs[rule] == jobs["fit_glmm"] == 4, rule
    assert jobs["figure_residuals"] == 4


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["sampling"]["default"].update(top_k="many"), "sampling.default.top_k"),
        (lambda c: c["sampling"]["default"].update(topk=5), "sampling.default.topk"),
        (lambda c: c["tasks"]["math"].pop("n_prompts"), "n_prompts"),
        (
            lambda c: c["families"]["tinygpt"]["base"].update(recipe="nope"),
            "families.tinygpt.base.recipe",
        ),
        (
            lambda c: c["stats"].update(formula="D ~ Rsc * variant + task + (1 | prompt_uid)"),
            "stats.formula = 'D ~ Rsc * variant + task + (1 | prompt_uid)': unknown variable(s) Rsc",
        ),
        (
            lambda c: c.update(figures={"slopes": {"scatter_alpha": 0}}),
            "figures.slopes.scatter_alpha = 0: Input should be greater than 0 "
            "(read by rule figure_slopes)",
        ),
        (lambda c: c.update(sweeps={"tasks": ["coding", "math"]}), "sweeps.tasks"),
        (
            lambda c: c["families"]["tinygpt"]["finetuned"].update(system_prompt=""),
            "families.tinygpt.finetuned.system_prompt = '': String should have at least 1 "
            "character (read by rules lock, sample_rollouts, sample_rollouts_chunk)",
        ),
    ],
    ids=[
        "wrong-type",
        "unknown-key",
        "missing-key",
        "dangling-reference",
        "formula-typo",
        "figure-setting",
        "sweep-without-reference",
        "chat-option",
    ],
)
def test_broken_config_fails_before_any_job_naming_the_key(tmp_path: Path, edit, expected) -> None:
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "-n", "--configfile", str(broken), check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert expected in message, message[-3000:]
    assert not (tmp_path / "results").exists()


def test_a_formula_typo_names_every_rule_that_reads_the_formula(tmp_path: Path) -> None:
    config = yaml.safe_load(TINY.read_text())
    config["stats"]["formula"] = "D ~ Rsc * variant + task + (1 | prompt_uid)"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(tmp_path, "-n", "--configfile", str(broken), check=False)
    message = result.stdout + result.stderr
    assert (
        "(read by rules fit_glmm, robustness_lmm, robustness_fixed_effects, "
        "robustness_length_matched, plan_power)" in message
    ), message[-3000:]


# ------------------------------------------------------------------- what a change reruns


def _recorded_outputs(workdir: Path) -> dict[str, dict]:
    """Snakemake's record of every output (.snakemake/metadata: one JSON file per output, named
    by the urlsafe base64 of its path, split into folders when long)."""
    records = {}
    root = workdir / ".snakemake" / "metadata"
    for path in root.rglob("*"):
        if path.is_file():
            name = base64.urlsafe_b64decode("".join(path.relative_to(root).parts)).decode()
            records[name] = json.loads(path.read_text())
    return records


def _record_finished_run(workdir: Path, config: str) -> Path:
    """The workflow of ``config`` as Snakemake sees it after a finished run, without running it:
    `--touch` records every job (its params included), then every output is created and touched
    again in DAG order. Snakemake's dry run then plans only what a config change makes stale."""
    snakemake(workdir, "--touch", "--cores", "1", "--configfile", config)
    for name in _recorded_outputs(workdir):
        path = workdir / name
        # The directory outputs of this workflow are folders of models and embeddings (no suffix).
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True, exist_ok=True)
    snakemake(workdir, "--touch", "--cores", "1", "--configfile", config)
    result = snakemake(workdir, "-n", "--configfile", config)
    assert planned_jobs(result.stdout) == {}, result.stdout[-2000:]
    return workdir


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the tiny config, as Snakemake records it."""
    workdir = tmp_path_factory.mktemp("recorded")
    return _record_finished_run(workdir, str(shutil.copy(TINY, workdir / "tiny.yaml")))


@pytest.fixture(scope="module")
def recorded_default(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of config.yaml, as Snakemake records it."""
    return _record_finished_run(tmp_path_factory.mktemp("default"), str(REPO / "config.yaml"))


def _plan_after(workdir: Path, edit) -> dict[str, int]:
    config = yaml.safe_load(TINY.read_text())
    edit(config)
    changed = workdir / "changed.yaml"
    # Key order kept: the order of tasks is the order of the panel's rows.
    changed.write_text(yaml.safe_dump(config, sort_keys=False))
    return planned_jobs(snakemake(workdir, "-n", "--configfile", str(changed)).stdout)


@pytest.mark.parametrize(
    ("edit", "rerun"),
    [
        (
            lambda c: c["stats"]["robustness"].update(length_repeats=7),
            {"robustness_length_matched"},
        ),
        (
            lambda c: c["stats"]["robustness"].update(
                fixed_effects_formula="logit_D ~ R_sc * variant + C(prompt_uid)"
            ),
            {"robustness_fixed_effects"},
        ),
        # The residuals figure draws the diagnostics' output.
        (lambda c: c["stats"].update(simulations=2000), {"glmm_diagnostics", "figure_residuals"}),
        (
            lambda c: c.setdefault("figures", {}).update(slopes={"scatter_alpha": 0.5}),
            {"figure_slopes"},
        ),
        (
            lambda c: c["stats"].update(formula="D ~ R_sc * variant + task + (1 | prompt_uid)"),
            # ... and what reads the fit: its diagnostics, the figures and tables drawn from it.
            {
                "fit_glmm",
                "robustness_lmm",
                "robustness_fixed_effects",
                "robustness_length_matched",
                "glmm_diagnostics",
                "figure_slopes",
                "figure_residuals",
                "headline",
                "figure_forest",
                "ablation_summary",
                "lock",
            },
        ),
        # The batch budgets never change a token: they are resources, and rerun nothing.
        (
            lambda c: c["sampling"]["default"].update(max_batch_rows=2, max_batch_tokens=4096),
            set(),
        ),
    ],
    ids=[
        "length_repeats",
        "fixed_effects_formula",
        "simulations",
        "scatter_alpha",
        "formula",
        "batch_budgets",
    ],
)
def test_a_setting_change_reruns_only_the_rules_that_read_it(
    recorded_run: Path, edit, rerun
) -> None:
    """Params carry exactly the keys a rule reads, so a changed setting reruns those jobs (and,
    through their outputs, what reads them) and nothing else: a robustness setting no longer
    reruns the GLMM fit, its diagnostics, two figures and the headline table."""
    planned = _plan_after(recorded_run, edit)
    assert set(planned) - {"all"} == rerun


def test_a_sampling_key_added_later_enters_the_params_only_when_set(recorded_run: Path) -> None:
    """min_p came after finished runs existed: at its default it is not in the sampling jobs'
    params, which those runs recorded without it (a new key there would rerun every finished
    sampling job); set, it is, and the sampling reruns."""
    records = _recorded_outputs(recorded_run).values()
    sampling = [r for r in records if r.get("rule") == "sample_rollouts"]
    params = [p for r in sampling for p in r["params"]]
    assert any("'top_k'" in p for p in params) and not any("min_p" in p for p in params)
    planned = _plan_after(recorded_run, lambda c: c["sampling"]["default"].update(min_p=0.2))
    assert planned["sample_rollouts"] == len(sampling)


def test_one_tasks_framing_resamples_only_that_variant_and_task(recorded_run: Path) -> None:
    """Per-task framing reaches sampling through framing_params, one (variant, task) at a time:
    a stop sequence for tinygpt's base on math resamples that job only (and what reads its
    rollouts), not the other task, variant or family."""

    def edit(config: dict) -> None:
        config["families"]["tinygpt"]["base"]["per_task"] = {"math": {"stop_sequences": ["t s"]}}

    planned = _plan_after(recorded_run, edit)
    assert planned["sample_rollouts"] == 1
    # A per_task entry for a task the config does not have names the key.
    config = yaml.safe_load(TINY.read_text())
    config["families"]["tinygpt"]["base"]["per_task"] = {"coding": {"stop_sequences": ["x"]}}
    broken = recorded_run / "broken.yaml"
    broken.write_text(yaml.safe_dump(config))
    result = snakemake(recorded_run, "-n", "--configfile", str(broken), check=False)
    assert result.returncode != 0
    assert "families.tinygpt.base.per_task.coding = 'coding': not a key of tasks" in (
        result.stdout + result.stderr
    )


def test_no_rule_takes_library_code_as_input(recorded_run: Path) -> None:
    """The stated policy (workflow/rules/common.smk): library modules are no input of any job, so
    an edit in src/canopy reruns nothing by itself (only a job's own script is tracked)."""
    records = _recorded_outputs(recorded_run)
    assert records, "no job was recorded"
    code = sorted(
        {path for record in records.values() for path in record["input"] if "src/canopy" in path}
    )
    assert code == []


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real end-to-end run of the tiny config with the default's kinds of sweep point (every
    stage, real models, R included)."""
    workdir = tmp_path_factory.mktemp("tiny")
    shutil.copy(TINY, workdir / "tiny.yaml")
    shutil.copy(TINY_SWEEPS, workdir / "tiny_sweeps.yaml")
    configs = [str(workdir / "tiny.yaml"), str(workdir / "tiny_sweeps.yaml")]
    snakemake(workdir, "--cores", "2", "--configfile", *configs)
    snakemake(workdir, "--report", str(workdir / "report.html"), "--configfile", *configs)
    return workdir


@pytest.mark.slow
def test_tiny_config_runs_end_to_end(tiny_run: Path) -> None:
    results = tiny_run / "results"
    panel = pd.read_parquet(results / "panel/default/minilm.parquet")
    assert len(panel) == 2 * 2 * 2 * 4
    # Each sweep point differs from the main setting in one thing, on the tasks of sweeps.tasks.
    for sweep in ("topk10/minilm", "default/minilm_prefixed"):
        swept = pd.read_parquet(results / f"panel/{sweep}.parquet")
        assert sorted(set(swept["task"])) == ["completion", "math"] and len(swept) == 2 * 2 * 2 * 4
    assert not (results / "panel/topk10/minilm_prefixed.parquet").exists()
    ablation = pd.read_csv(results / "ablation/summary.tsv", sep="\t")
    assert sorted(zip(ablation["sampling"], ablation["embedder"])) == [
        ("default", "minilm"),
        ("default", "minilm_prefixed"),
        ("topk10", "minilm"),
    ]
    assert set(panel["variant"]) == {"base", "finetuned"}
    assert panel["D"].between(0, 1).all() and (panel["VS"] >= 1 - 1e-9).all()
    # The decomposition is an identity on every prompt of every model.
    np.testing.assert_allclose(
        panel["CE"], panel["decomposition_product"] + panel["cov_length_rate"], atol=1e-9
    )
    rollouts = pd.read_parquet(results / "rollouts/default/tinyllama/finetuned/math.parquet")
    assert len(rollouts) == 4 * 6
    assert (rollouts["n_steps"] <= 16).all()
    np.testing.assert_allclose(
        rollouts["sum_entropy"], [np.sum(h) for h in rollouts["step_entropy"]], rtol=1e-9
    )
    summary = json.loads((results / "stats/default/minilm/glmm/summary.json").read_text())
    assert summary
    slopes = pd.read_csv(results / "stats/default/minilm/glmm/slopes.tsv", sep="\t")
    assert {"base", "finetuned", "ratio"} <= set(slopes["variant"])
    for path in (
        "stats/default/minilm/diagnostics/tests.json",
        "stats/default/minilm/robustness/lmm.tsv",
        "stats/default/minilm/robustness/fixed_effects.tsv",
        "stats/default/minilm/robustness/length_matched.tsv",
        "stats/default/minilm/paired_bootstrap.tsv",
        "headline.tsv",
    ):
        assert (results / path).stat().st_size > 0, path
    assert list((results / "figures").rglob("*.pdf")), "no figure was drawn"
    assert (tiny_run / "report.html").stat().st_size > 10_000
    # A finished run leaves no resumable shards behind.
    assert not list((results / "rollouts").rglob("*.shards"))


@pytest.mark.slow
def test_finished_run_plans_nothing(tiny_run: Path) -> None:
    configs = [str(tiny_run / "tiny.yaml"), str(tiny_run / "tiny_sweeps.yaml")]
    result = snakemake(tiny_run, "-n", "--configfile", *configs)
    assert planned_jobs(result.stdout) == {}, result.stdout[-2000:]
