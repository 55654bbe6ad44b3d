# Shared helpers: configuration validation, the experiment matrix, and input functions.

import os
import re
import sys
from pathlib import Path

# The repository root, found from this file rather than from the main Snakefile, so that a
# Snakefile elsewhere (a user's wrapper, the figure tests) can include the stages it needs.
REPO_ROOT = Path(workflow.current_basedir.abspath().path).parents[1]
sys.path.insert(0, str(REPO_ROOT / "src"))

from snakemake.exceptions import WorkflowError

from canopy.config import CHAT_OPTION_KEYS, VARIANTS, ConfigError, SamplingSettings, validate_config
from canopy.modeling import chat_options, visible_cuda_devices
from canopy.sources.registry import SOURCES
from canopy.sources.source import SourceError


# Library code is no input of any job, one policy for all. Snakemake reruns a job when its
# script in workflow/scripts changes, but an edit in src/canopy/ reruns nothing by itself, because
# every stage imports shared modules (canopy.io) and an edit there would otherwise redo the
# sampling hours of a finished run. After changing what a stage computes, rerun it on purpose:
# `snakemake --forcerun <rule>` (tests/test_workflow.py checks that no job lists library files).
#
# Params are exactly what a rule reads, so that Snakemake's params rerun trigger reruns only the
# jobs whose settings changed (editing stats.robustness.length_repeats reruns the length-matched
# reanalysis, not the GLMM fit). Every rule takes its settings through config_provider, which is
# also how a config error finds the rules that read the bad key (rules_reading below).
def config_provider(block, *keys, **derived):
    """Params input function (after PyPSA-Eur's): the config under the dotted ``block`` with
    ``{wildcards}`` filled in per job, reduced to ``keys`` (dotted; ``*`` for every entry) when
    given. ``derived`` fills further ``{names}`` of ``block`` from the wildcards (e.g. a family's
    recipe)."""

    def provide(wildcards):
        names = {**wildcards, **{name: fn(wildcards) for name, fn in derived.items()}}
        node = _config_at(block.format(**names)) if block else config
        return _select(node, keys) if keys else node

    return provide


def _config_at(dotted):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _select(node, keys):
    """The nested mapping of ``node`` holding only the dotted ``keys``."""
    out = {}
    for key in keys:
        _put(out, node, key.split("."))
    return out


def _put(out, node, parts):
    head, rest = parts[0], parts[1:]
    for name in node if head == "*" else [head]:
        if rest:
            _put(out.setdefault(name, {}), node[name], rest)
        else:
            out[name] = node[name]


def config_value(dotted):
    """Resources input function: the one config value at ``dotted`` with ``{wildcards}`` filled in
    per job. Resources, unlike params, never rerun a finished job: for settings that cannot change
    a result (a batch's memory budget)."""

    def value(wildcards):
        return _config_at(dotted.format(**wildcards))

    return value


_READS_CALL = re.compile(r'config_(?:provider|value)\(\s*"([^"]*)"((?:\s*,\s*"[^"]*")*)')

#: The keys of a variant (and of its per_task entries) that frame its prompts and end its
#: rollouts (framing_params).
FRAMING_KEYS = ("prompt_template", "stop_tokens_containing", "stop_sequences")

#: Params functions that combine several keys into one value (a pattern of their call), and the
#: keys they read: a family's chat options, overridden by its finetuned variant's (chat_params;
#: set on base, an error), and the keys of one kind of model source, those set
#: (source_params("<kind>")).
_READING_FUNCTIONS = {
    r"\bchat_params\b": [
        f"families.{{family}}.{level}{option}"
        for level in ("", *(f"{variant}." for variant in VARIANTS))
        for option in CHAT_OPTION_KEYS
    ],
    **{
        rf'\bsource_params\(\s*"{kind}"\s*\)': [
            f"families.{{family}}.{{variant}}.{key}" for key in source.keys
        ]
        for kind, source in SOURCES.items()
    },
    r"\bframing_params\b": [
        f"families.{{family}}.{{variant}}.{level}{key}"
        for level in ("", "per_task.{task}.")
        for key in FRAMING_KEYS
    ],
}


def rules_reading(key):
    """The rules whose params or resources hold ``key`` (a key path) or part of it, from their
    config_provider and config_value calls in workflow/rules/*.smk and the params functions of
    _READING_FUNCTIONS they use."""
    key = [str(part) for part in key]
    found = []
    for path in sorted((REPO_ROOT / "workflow/rules").glob("*.smk")):
        for chunk in re.split(r"^(?:rule|checkpoint) ", path.read_text(), flags=re.M)[1:]:
            name = chunk.split(":", 1)[0].strip()
            read = [
                f"{block}.{sub}"
                for block, rest in _READS_CALL.findall(chunk)
                for sub in re.findall(r'"([^"]*)"', rest) or [""]
            ]
            for call, keys in _READING_FUNCTIONS.items():
                if re.search(call, chunk):
                    read += keys
            for dotted in read:
                pattern = ["*" if p.startswith("{") else p for p in dotted.split(".") if p]
                if all(p in ("*", k) for p, k in zip(pattern, key)):
                    found.append(name)
    return list(dict.fromkeys(found))


try:
    config.update(validate_config(config, readers=rules_reading))
except ConfigError as error:
    raise WorkflowError(
        f"{error}\nFix these keys in your config file (every key is described in "
        "workflow/schemas/config.schema.yaml; config.yaml is a valid example)."
    )


FAMILIES = list(config["families"])
TASKS = list(config["tasks"])
SAMPLINGS = list(config["sampling"])
# Sampling entries with a `filter` block are made from another entry's rollouts (filters.smk).
FILTERED_SAMPLINGS = [s for s in SAMPLINGS if config["sampling"][s].get("filter")]
EMBEDDERS = list(config["embedders"])


SWEEPS = config.get("sweeps") or {}


def _combinations():
    """The (sampling point, embedder) pairs that get a panel, a regression and a row of the
    ablation summary: every pair (`sweeps.design: grid`), or each sampling point with the first
    embedder and each further embedder with the first sampling point (`one_at_a_time`, an
    ablation that changes one thing at a time from the main setting)."""
    if SWEEPS.get("design", "grid") == "grid":
        return [(s, e) for s in SAMPLINGS for e in EMBEDDERS]
    return [(s, EMBEDDERS[0]) for s in SAMPLINGS] + [(SAMPLINGS[0], e) for e in EMBEDDERS[1:]]


COMBINATIONS = _combinations()
MAIN_COMBINATION = (SAMPLINGS[0], EMBEDDERS[0])
_sweep_tasks = SWEEPS.get("tasks")
# sweeps.tasks names known tasks and holds stats.reference_task (checked when validated).


# The pairs that get residual diagnostics, robustness refits and the residual figure.
CHECKED_COMBINATIONS = (
    COMBINATIONS if SWEEPS.get("checks", "main") == "every_pair" else [MAIN_COMBINATION]
)


def combination_tasks(sampling, embedder):
    """The tasks of one analysed pair: every task for the main setting (first sampling point,
    first embedder), `sweeps.tasks` (when set) for every other pair, in the order of tasks.
    """
    if (sampling, embedder) == MAIN_COMBINATION or not _sweep_tasks:
        return list(TASKS)
    return [t for t in TASKS if t in _sweep_tasks]


def sampling_tasks(sampling):
    """The tasks a sampling point is analysed on: those of its pairs, in the order of tasks."""
    wanted = {t for s, e in COMBINATIONS if s == sampling for t in combination_tasks(s, e)}
    return [t for t in TASKS if t in wanted]


def _matrix(tasks):
    return [(f, v, t) for f in FAMILIES for v in VARIANTS for t in tasks]


def combination_matrix(wildcards):
    """(family, variant, task) of a pair's panel, for the {sampling} and {embedder} wildcards."""
    return _matrix(combination_tasks(wildcards.sampling, wildcards.embedder))


def combination_paths(pattern, combinations=None):
    """The pattern's path for every analysed (sampling point, embedder) pair (or for the given
    ones), in order."""
    return [
        pattern.format(sampling=s, embedder=e)
        for s, e in (COMBINATIONS if combinations is None else combinations)
    ]


def _one_of(names):
    """Regex accepting exactly the given names (none: a regex that never matches)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


def sampled_point(sampling):
    """The sampling entry that actually sampled a sweep point's rollouts (a filter's `from`)."""
    spec = config["sampling"][sampling].get("filter")
    return spec["from"] if spec else sampling


def model_source(family, variant):
    return config["families"][family][variant]["source"]


def source_of(family, variant):
    """The source of one model (canopy.sources): how its directory is made and recorded."""
    return SOURCES[model_source(family, variant)]


# Sampling points whose rollouts are sampled by rollouts.smk (a point produced otherwise, e.g. by
# filtering another point's rollouts, is left out here); those with `chunks` > 1 are sampled as
# that many jobs and gathered.
SAMPLED_POINTS = list(SAMPLINGS)
CHUNKED_POINTS = [s for s in SAMPLED_POINTS if config["sampling"][s].get("chunks", 1) > 1]
UNCHUNKED_POINTS = [s for s in SAMPLED_POINTS if s not in CHUNKED_POINTS]


# Every model, as (family, variant), by the rule that makes its directory; a model used where it
# is (source: local) has none. Each rule that makes models accepts exactly its own (made_by), so
# one rule matches each model directory, whichever sources a family mixes.
MODELS_BY_RULE = {}
for _family in FAMILIES:
    for _variant in VARIANTS:
        _maker = source_of(_family, _variant).rule_for(_variant)
        if _maker is not None:
            MODELS_BY_RULE.setdefault(_maker, []).append((_family, _variant))


def made_by(rule, variant=None):
    """Wildcard constraint accepting the models made by the rule named ``rule``, as
    family/variant for a {model} wildcard, or as the families of ``variant`` where the output
    names the variant."""
    models = MODELS_BY_RULE.get(rule, [])
    if variant is None:
        return _one_of([os.path.join(f, v) for f, v in models])
    return _one_of([f for f, v in models if v == variant])


TRAINED_FAMILIES = [f for f in FAMILIES if model_source(f, "base") == "train"]
# Families whose fine-tuned variant is made here from their base, whatever its source.
FINETUNED_HERE = [f for f in FAMILIES if model_source(f, "finetuned") == "finetune"]


def _check_sources():
    """Stop before any job when a model that is not made yet cannot be made as configured (a
    GGUF package that is not installed, a file that is not GGUF), naming the key and the rule
    that reads it. Each source's check is light (no model library is imported while the
    workflow is planned); a model already made is not checked again, so uninstalling the
    package it came from loses nothing."""
    for family in FAMILIES:
        for variant in VARIANTS:
            source = source_of(family, variant)
            spec = config["families"][family][variant]
            try:
                source.check(
                    spec,
                    config_key=f"families.{family}.{variant}",
                    directory=source.directory(family, variant, spec),
                )
            except SourceError as error:
                raise WorkflowError(f"{error} (read by rule {source.rule_for(variant)})")


if workflow.is_main_process:
    _check_sources()


def embedder_source(name):
    """package (shipped by a PyPI package), hub (an id with a revision: fetched into resources/)
    or local (a directory of the user's)."""
    spec = config["embedders"][name]
    if spec["model"].startswith("package:"):
        return "package"
    return "hub" if spec.get("revision") else "local"


HUB_EMBEDDERS = [e for e in EMBEDDERS if embedder_source(e) == "hub"]
HUB_TASKS = [t for t in TASKS if config["tasks"][t]["source"] == "hub"]


wildcard_constraints:
    family=_one_of(FAMILIES),
    variant=_one_of(VARIANTS),
    task=_one_of(TASKS),
    sampling=_one_of(SAMPLINGS),
    embedder=_one_of(EMBEDDERS),


def model_path(family, variant):
    """The transformers directory of one model: made or fetched under resources/, or the user's
    own, as its source says."""
    spec = config["families"][family][variant]
    return source_of(family, variant).directory(family, variant, spec)


def model_dir(wildcards):
    return model_path(wildcards.family, wildcards.variant)


def _classifier_specs():
    """Sequence classifiers the config names, by the name of their resources/classifiers/ folder:
    the reward model of each filtered sampling point and the NLI model of semantic entropy.
    """
    specs = {
        f"reward-{s}": (
            config["sampling"][s]["filter"]["reward_model"],
            f"sampling.{s}.filter.reward_model",
        )
        for s in FILTERED_SAMPLINGS
    }
    semantic = config.get("diversity", {}).get("semantic_entropy")
    if semantic:
        specs["nli"] = (semantic, "diversity.semantic_entropy")
    return specs


# Those with a revision are hub models, fetched by download_classifier like the models.
HUB_CLASSIFIERS = {
    name: (spec, key) for name, (spec, key) in _classifier_specs().items() if spec.get("revision")
}


def classifier_dir(name):
    """Input function: the fetched directory of a hub classifier, or nothing (a package or a
    local directory named by `model`, loaded where it is)."""
    return lambda wildcards: (
        f"resources/classifiers/{name.format(**wildcards)}"
        if name.format(**wildcards) in HUB_CLASSIFIERS
        else []
    )


def embedder_path(name):
    """The embedder's model directory (fetched or the user's); None for a packaged one."""
    source = embedder_source(name)
    if source == "hub":
        return f"resources/embedders/{name}"
    return config["embedders"][name]["model"] if source == "local" else None


def embedder_dir(wildcards):
    """Input function: the embedder's directory, or nothing for a packaged one."""
    return embedder_path(wildcards.embedder) or []


def model_dirs(wildcards=None):
    """Every model directory of the experiment, family by family (base, then fine-tuned)."""
    return [model_path(f, v) for f in FAMILIES for v in VARIANTS]


def embedder_dirs(wildcards=None):
    """The directories of the embedders that have one (fetched or local), in config order."""
    return [path for e in EMBEDDERS if (path := embedder_path(e)) is not None]


def prompt_source_files(wildcards):
    """A task's own jsonl file, as an input: editing it re-prepares the prompts, and a missing one
    stops the run before any job starts (packaged, generated and hub sources have no such file).
    """
    spec = config["tasks"][wildcards.task]
    return [spec["path"]] if spec["source"] == "jsonl" else []


def recipe_name(variant):
    """Input function: the recipe a variant made here names (training.recipes for a trained
    family, training.finetunes for a fine-tune of a family's base)."""
    return lambda wildcards: config["families"][wildcards.family][variant]["recipe"]


def device_gpus(device):
    """GPUs a job asks for: none when pinned to the CPU, one otherwise (CUDA is used when present).

    `auto` asks for none only when the job runs here (the local executor, not a dry run) and this
    machine has no CUDA device: the job then runs on the CPU anyway, and asking for a GPU would
    make the local `gpu` limit run such jobs one at a time. A cluster executor, or a dry run that
    plans for one, always asks for the GPU that `auto` uses on the node.
    """
    if device == "cpu":
        return 0
    plugin = workflow.executor_plugin
    runs_here = plugin is not None and not (
        plugin.common_settings.non_local_exec
        or plugin.common_settings.dryrun_exec
        or plugin.common_settings.touch_exec
    )
    if device == "auto" and runs_here and visible_cuda_devices() == 0:
        return 0
    return 1


# The keys sample_rollouts reads: an entry's sampling keys, not its filter block.
# The batch budgets decide how much memory a sampling job uses, never which tokens it draws: they
# reach it as resources (config_value), so lowering them after running out of memory reruns no
# finished job; every other sampling key is a param.
BATCH_BUDGETS = ["max_batch_rows", "max_batch_tokens"]


def sampling_params(wildcards):
    """The sampling point's keys as SamplingSettings.to_dict gives them (a key added after runs
    existed only when set, so that their finished jobs stay finished), less the batch budgets."""
    settings = SamplingSettings.from_config(config["sampling"][wildcards.sampling])
    return {key: value for key, value in settings.to_dict().items() if key not in BATCH_BUDGETS}


def chat_params(wildcards):
    """The variant's chat-template options (none for base): a change reruns only this family."""
    try:
        return chat_options(
            config["families"][wildcards.family],
            wildcards.variant,
            name=wildcards.family,
        )
    except ValueError as error:
        raise WorkflowError(str(error))


def framing_params(wildcards):
    """The framing keys that are set for this (variant, task): the base's prompt_template (the
    document it continues), stop_tokens_containing and stop_sequences (where its rollouts also
    end), the task's per_task entry winning key by key over the variant's own; a change
    resamples only the (variant, task) pairs it reaches."""
    spec = config["families"][wildcards.family][wildcards.variant]
    task = (spec.get("per_task") or {}).get(wildcards.task, {})
    merged = {**spec, **task}
    return {key: merged[key] for key in FRAMING_KEYS if key in merged}


def source_params(kind):
    """Params function of the rule that makes models of one kind of source, from its {model}
    wildcard ("family/variant"): the keys of that source which are set (a chat option of the same
    entry changes what is sampled, not how the model is made)."""
    keys = SOURCES[kind].keys

    def params(wildcards):
        family, variant = wildcards.model.split("/")
        spec = config["families"][family][variant]
        return {key: spec[key] for key in keys if key in spec}

    return params


def sampling_gpus(wildcards):
    return device_gpus(config["sampling"][wildcards.sampling]["device"])


def analysis_targets():
    """The headline table, an example rollout of each model and task, every analysed pair's
    regression and paired bootstrap, and the diagnostics and robustness tables of the checked pairs
    (`sweeps.checks`)."""
    robustness = config["stats"]["robustness"]
    tables = [
        "results/stats/{sampling}/{embedder}/glmm/summary.json",
        "results/stats/{sampling}/{embedder}/paired_bootstrap.tsv",
    ]
    checks = ["results/stats/{sampling}/{embedder}/diagnostics/tests.json"] + [
        f"results/stats/{{sampling}}/{{embedder}}/robustness/{check}.tsv"
        for check in ("lmm", "fixed_effects", "length_matched")
        if robustness[check]
    ]
    return (
        ["results/headline.tsv", "results/examples.tsv"]
        + [path for table in tables for path in combination_paths(table)]
        + [path for table in checks for path in combination_paths(table, CHECKED_COMBINATIONS)]
    )


# Every (family, variant, task) of the experiment, in the order stats scripts pair with paths.
MATRIX = [(f, v, t) for f in FAMILIES for v in VARIANTS for t in TASKS]


def semantic_entropy_paths():
    """Input function of the panel: the semantic-entropy tables when diversity.semantic_entropy
    is set, else none."""
    if not config["diversity"].get("semantic_entropy"):
        return []
    return matrix_paths(
        "results/semantic_entropy/{sampling}/{family}/{variant}/{task}.parquet",
        combination_matrix,
    )


def matrix_paths(pattern, matrix=None):
    """Input function: the pattern's path for every (family, variant, task) of ``matrix`` (all of
    MATRIX by default; a list, or a function of the wildcards that returns one), in that order;
    scripts pair the paths with the same list in params.
    """

    def paths(wildcards):
        keys = MATRIX if matrix is None else matrix
        return [
            pattern.format(family=f, variant=v, task=t, **wildcards)
            for f, v, t in (keys(wildcards) if callable(keys) else keys)
        ]

    return paths


# Figures (rules in figures.smk).
# Figures of one sampling setting, of one analysed (sampling setting, embedder) pair, and of
# one checked pair (the residuals come from its diagnostics).
SAMPLING_FIGURES = ["decomposition", "trajectory", "lengths", "variance", "rho"]
EMBEDDER_FIGURES = ["slopes"]
CHECKED_FIGURES = ["residuals"]


def figure_matrix(name):
    """(family, variant, task) drawn by a figure of the {sampling} wildcard's point, as a function
    of the wildcards: the figure's `tasks` setting (checked against tasks when the config is
    validated), or every task in config order, among the tasks that sampling point is analysed
    on."""
    tasks = config["figures"][name].get("tasks") or TASKS

    def matrix(wildcards):
        return _matrix([t for t in tasks if t in sampling_tasks(wildcards.sampling)])

    return matrix


def figure_inputs(name, pattern):
    """Input function: the pattern's path for every (family, variant, task) of the figure, in
    figure_matrix order (the script pairs them with params.matrix)."""
    return matrix_paths(pattern, figure_matrix(name))


def figure_targets():
    """Every figure of every sampling setting (1-4, 7), of every analysed (sampling setting,
    embedder) pair (5) and checked pair (6), and the ablation forest plot over all of them (8).
    """
    return (
        expand(
            "results/figures/{sampling}/{figure}.{ext}",
            sampling=list(config["sampling"]),
            figure=SAMPLING_FIGURES,
            ext=["pdf", "png"],
        )
        + [
            path
            for figure in EMBEDDER_FIGURES
            for ext in ("pdf", "png")
            for path in combination_paths(
                f"results/figures/{{sampling}}/{{embedder}}/{figure}.{ext}"
            )
        ]
        + [
            path
            for figure in CHECKED_FIGURES
            for ext in ("pdf", "png")
            for path in combination_paths(
                f"results/figures/{{sampling}}/{{embedder}}/{figure}.{ext}",
                CHECKED_COMBINATIONS,
            )
        ]
        + expand("results/figures/ablation_forest.{ext}", ext=["pdf", "png"])
    )
