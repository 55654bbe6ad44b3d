"""What the tests share, so that no test module imports another.

- ``models``: tiny random-weight transformers models and word-level tokenizers, saved as ordinary
  model directories (the benchmarks build their random models with the same builders);
- ``oracle``: the float64 sampling oracle of the exactness tests;
- ``enumeration``: the exact canopy by enumerating every rollout of a small model;
- ``hub_repos`` and ``hub_server``: tiny hub repositories and the hub-protocol server that serves them;
- ``slurm_cluster``: a single-node Slurm started for the cluster tests;
- ``workflow``: running Snakemake on the repository and killing it mid-way;
- ``sampling``: the prompts, prompt files and loggers of the sampling-job tests;
- ``vllm_truth``: a script run inside build/vllm's Python, not imported.

tests/ has no ``__init__``, so pytest puts tests/ on ``sys.path`` and this package imports as
``support``; the requirement files of the extra test environments and the tiny configs and data stay
in tests/ where setup.sh and the README name them.
"""
