"""Validation of the workflow configuration against its JSON schema.

Snakemake's own ``validate`` stops at the first problem and reports it in schema terms. Users edit
``config.yaml`` by hand, so this validator lists every problem, each with the dotted key that is
wrong (``sampling.default.top_k``) and the schema rule it breaks (``type: integer``), and it fills in
the schema's defaults so that rules can rely on every key being present.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

__all__ = ["ConfigError", "check_references", "format_key", "load_schema", "validate_config"]


class ConfigError(ValueError):
    """The configuration breaks the schema; the message names every offending key."""


def load_schema(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def format_key(path: Any) -> str:
    """Dotted key for a JSON path (``['sampling', 'default', 'top_k']`` -> ``sampling.default.top_k``)."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _with_defaults(validator_class: type[jsonschema.protocols.Validator]) -> type:
    """A validator class that also writes each property's ``default`` into the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001 - jsonschema hook
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


#: For each top-level config block, the workflow rules that read it. ``{name}`` stands for the
#: block's second-level key (``figures.trajectory`` is read by ``figure_trajectory``).
Consumers = Mapping[str, Sequence[str]]


def _consumers_of(path: Sequence[Any], consumers: Consumers | None) -> str:
    if not consumers or not path or path[0] not in consumers:
        return ""
    second = str(path[1]) if len(path) > 1 else "<name>"
    rules = [rule.replace("{name}", second) for rule in consumers[path[0]]]
    return f" (read by rule{'s' if len(rules) > 1 else ''} {', '.join(rules)})"


def _describe(error: jsonschema.ValidationError, consumers: Consumers | None = None) -> str:
    return _describe_key(error) + _consumers_of(list(error.absolute_path), consumers)


def _describe_key(error: jsonschema.ValidationError) -> str:
    key = format_key(error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        # additionalProperties errors sit on the parent; name the unknown child keys themselves.
        names = ", ".join(f"{key}.{name}" if key != "<top level>" else name for name in unknown)
        return f"unknown key {names} (allowed here: {', '.join(allowed)}) [schema rule: additionalProperties]"
    if error.validator == "required":
        return f"{key}: {error.message} [schema rule: required]"
    rule = f"{error.validator}: {error.validator_value!r}"
    if isinstance(error.validator_value, (dict, list)) and len(repr(error.validator_value)) > 60:
        rule = str(error.validator)
    return f"{key}: {error.message} [schema rule: {rule}]"


def validate_config(
    config: Mapping[str, Any],
    schema: Mapping[str, Any] | str | Path,
    consumers: Consumers | None = None,
) -> dict[str, Any]:
    """Validate ``config`` and return a copy with the schema's defaults filled in.

    Raises :class:`ConfigError` listing every violation, each naming its key, the schema rule it
    breaks and, when ``consumers`` is given, the workflow rules that read that key.
    """
    if not isinstance(schema, Mapping):
        schema = load_schema(schema)
    filled = copy.deepcopy(dict(config))
    validator_class = _with_defaults(jsonschema.validators.validator_for(schema))
    validator = validator_class(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(error, consumers)}" for error in errors)
        raise ConfigError(f"the configuration breaks its schema ({len(errors)} problem(s)):\n{lines}")
    return filled


def check_references(config: Mapping[str, Any]) -> None:
    """Checks a JSON schema cannot express: keys that must name other keys, paths that must exist.

    Raises :class:`ConfigError` naming every offending key.
    """
    problems: list[str] = []
    recipes = config.get("training", {}).get("recipes", {})
    for family, pair in config.get("families", {}).items():
        sources = {variant: spec["source"] for variant, spec in pair.items()}
        for variant, spec in pair.items():
            key = f"families.{family}.{variant}"
            if spec["source"] == "train" and spec.get("recipe") not in recipes:
                problems.append(
                    f"{key}.recipe: {spec.get('recipe')!r} is not a key of training.recipes "
                    f"(known: {', '.join(sorted(recipes)) or 'none'})"
                )
            if spec["source"] == "local" and not Path(spec["path"]).is_dir():
                problems.append(
                    f"{key}.path: {spec['path']} is not a directory; put the transformers model "
                    "directory there (config.json, weights, tokenizer) or correct the path"
                )
        # A fine-tuned model is made from its own base, so a trained family trains both.
        if (sources.get("base") == "train") != (sources.get("finetuned") == "train"):
            problems.append(
                f"families.{family}: source 'train' must be used for both base and finetuned "
                "(the fine-tuned model is made from the trained base)"
            )
    sampling = config.get("sampling", {})
    for name, spec in sampling.items():
        source = (spec.get("filter") or {}).get("from")
        if source is not None and (source not in sampling or sampling[source].get("filter")):
            sampled = [n for n, other in sampling.items() if not other.get("filter")]
            problems.append(
                f"sampling.{name}.filter.from: {source!r} must name a sampling entry that samples "
                f"(not a filter): one of {', '.join(sampled) or 'none'}"
            )
    stats = config.get("stats", {})
    reference_task = stats.get("reference_task")
    if reference_task is not None and reference_task not in config.get("tasks", {}):
        problems.append(
            f"stats.reference_task: {reference_task!r} is not a key of tasks "
            f"(known: {', '.join(config.get('tasks', {}))})"
        )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"the configuration is inconsistent ({len(problems)} problem(s)):\n{lines}")
