"""canopy: Canopy Entropy of language models.

The library under the canopy-entropy Snakemake workflow. Every stage is plain Python that a
notebook can import: prompt data (:mod:`canopy.prompts`), model pairs (:mod:`canopy.models`),
rollout sampling with exact per-step entropies (:mod:`canopy.sampling`), Canopy Entropy
estimators (:mod:`canopy.entropy`), semantic diversity (:mod:`canopy.diversity`), the analysis
panel (:mod:`canopy.panel`), the mixed-effects statistics (:mod:`canopy.stats`) and the paper's
figures (:mod:`canopy.figures`).
"""

__version__ = "0.1.0"
