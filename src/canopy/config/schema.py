"""The JSON schema of the configuration, generated from the models (never edited by hand).

``python -m canopy.config.schema`` rewrites ``workflow/schemas/config.schema.yaml``;
``--check`` exits non-zero when the committed file differs from what the models give (the test
suite runs it). Editors with YAML language support can validate config files against it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from canopy.config.root import Config

__all__ = ["SCHEMA_PATH", "config_schema", "render_schema"]

SCHEMA_PATH = Path("workflow/schemas/config.schema.yaml")
_HEADER = (
    "# Generated from the models in src/canopy/config/ by `python -m canopy.config.schema`:\n"
    "# edit the models, not this file (a test compares the two).\n"
)


def config_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a whole configuration file."""
    schema = _tidy(Config.model_json_schema(by_alias=True, mode="validation"))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "canopy-entropy configuration",
        **schema,
    }


def _tidy(node: Any) -> Any:
    """Descriptions on one line (they come from docstrings), without pydantic's generated titles."""
    if isinstance(node, dict):
        tidy = {
            key: " ".join(value.split()) if key == "description" else _tidy(value)
            for key, value in node.items()
            if not (key == "title" and isinstance(value, str))
        }
        if "patternProperties" in tidy:
            # Entry names (tasks, families, ...) outside the pattern are refused, as by the models.
            tidy.setdefault("additionalProperties", False)
        return tidy
    if isinstance(node, list):
        return [_tidy(item) for item in node]
    return node


def render_schema() -> str:
    """The schema as the YAML text committed in the repository."""
    body = yaml.safe_dump(config_schema(), sort_keys=False, width=100, allow_unicode=True)
    return _HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=SCHEMA_PATH)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render_schema()
    if args.check:
        current = args.path.read_text() if args.path.exists() else ""
        if current != text:
            print(
                f"{args.path} is out of date: run python -m canopy.config.schema", file=sys.stderr
            )
            return 1
        return 0
    args.path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
