"""Where a model comes from: one module per kind of source, each with its config block, the rule
that makes ``resources/models/{family}/{variant}/`` and its provenance record.

* :mod:`canopy.sources.record` — the one record every made model directory holds (which source
  made it, and the source's own details), its writer and its reader;
* :mod:`canopy.sources.source` — :class:`~canopy.sources.source.ModelSource`, what every kind
  says about itself;
* :mod:`canopy.sources.train`, :mod:`canopy.sources.hub`, :mod:`canopy.sources.local`,
  :mod:`canopy.sources.gguf`, :mod:`canopy.sources.finetune` — the kinds;
* :mod:`canopy.sources.registry` — every kind by its ``source`` value, which the workflow's
  input functions, the config check at plan time and the lock file go through.

Adding a source means its module here (with its config block in :mod:`canopy.config.families`),
its line in the registry, its rule in ``workflow/rules/models.smk`` and its test.

This package imports nothing heavy when imported (no torch, no transformers): the workflow reads
the registry while it parses the Snakefile. The package itself imports none of its modules, so
that the fetching and converting code can import :mod:`canopy.sources.record` alone.
"""
