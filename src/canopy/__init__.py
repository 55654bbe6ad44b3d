"""canopy: Canopy Entropy of language models.

The library under the canopy-entropy Snakemake workflow. Every stage is plain Python that a
notebook can import (docs/architecture.md maps stages, rules, modules and files):

* prompts: :mod:`canopy.prompts` (sources, the HumanEval rewrite, generators);
* model pairs: :mod:`canopy.training` (the default's own small families: corpus, tokenizers, chat
  templates, the training loop), :mod:`canopy.hub` (fetching models, embedders and data sets at a
  commit) and :mod:`canopy.modeling` (loading a pair and formatting its prompts);
* rollouts with exact per-step entropies: :mod:`canopy.sampling`, and :mod:`canopy.filtering`
  (reward-filtered rollout sets);
* per-prompt metrics: :mod:`canopy.entropy` (Canopy Entropy estimators), :mod:`canopy.diversity`
  (semantic diversity), :mod:`canopy.semantic_entropy`, :mod:`canopy.bootstrap` (paired prompt
  bootstrap);
* analysis: :mod:`canopy.panel`, :mod:`canopy.stats` (Beta GLMM), :mod:`canopy.robustness`,
  :mod:`canopy.figures`, :mod:`canopy.report` and :mod:`canopy.overview` (tables and the report's
  introduction), :mod:`canopy.provenance` (the lock file);
* shared: :mod:`canopy.config` (configuration checks) and :mod:`canopy.io` (atomic writes, JSON
  lines).
"""

__version__ = "0.1.0"
