"""Gather the commits of every model, prompt set and embedder of the run into the lock file."""

from script_setup import setup

log = setup(snakemake)

import yaml  # noqa: E402

from canopy.io import atomic_path, read_json, write_tsv  # noqa: E402
from canopy.provenance import (  # noqa: E402
    build_lock,
    classifier_entry,
    embedder_entry,
    lock_table,
    model_entry,
)

inputs, params = snakemake.input, snakemake.params
# inputs.models runs family by family, base then fine-tuned, in config order.
pairs = [(family, variant) for family in params.families for variant in ("base", "finetuned")]
models = []
for (family, variant), directory in zip(pairs, inputs.models, strict=True):
    # A fine-tune made here is pinned by its base, whose entry comes just before it.
    base = models[-1] if variant == "finetuned" else None
    models.append(model_entry(family, variant, params.families[family][variant], directory, base))
# A packaged embedder has no input directory: pair the others with theirs in config order.
directories = iter(inputs.embedders)
embedders = [
    embedder_entry(name, spec, None if spec["model"].startswith("package:") else next(directories))
    for name, spec in params.embedders.items()
]
# Every fit ran in the same R: the first one's summary names its versions.
r_versions = read_json(inputs.glmm[0])["R"] if inputs.glmm else None
lock = build_lock(
    models=models,
    prompts=[read_json(path) for path in inputs.prompts],
    embedders=embedders,
    classifiers=[
        classifier_entry(name, directory)
        for name, directory in zip(params.classifiers, inputs.classifiers, strict=True)
    ],
    r_versions=r_versions,
)
with atomic_path(snakemake.output.lock) as tmp:
    tmp.write_text(yaml.safe_dump(lock, sort_keys=False))
write_tsv(lock_table(lock), snakemake.output.table)
log.info(
    "lock file: %d models, %d prompt sets, %d embedders",
    len(models),
    len(lock["prompts"]),
    len(embedders),
)
