"""``source: train``: both models of a family made by this workflow from its own corpus
(canopy.training, the embedded default): the base by ``pretrain_base_model``, the fine-tune of it by
``finetune_model``, the rule that fine-tunes any base. The training run's record (recipe, loss
curve) is its record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from canopy.config.families import TrainSource
from canopy.sources.record import LEGACY_RECORD_FILES
from canopy.sources.source import Model, ModelSource

__all__ = ["SOURCE", "TRAINING_LOG", "Train"]

#: The file a training run's record had before the one record file.
TRAINING_LOG = LEGACY_RECORD_FILES["train"]


class Train(ModelSource):
    settings = TrainSource
    rule = "pretrain_base_model"
    legacy_records = (TRAINING_LOG,)

    def rule_for(self, variant: str) -> str | None:
        # The fine-tuned model is made by the one fine-tune rule, from the base's directory.
        return self.rule if variant == "base" else "finetune_model"

    def lock_entry(self, model: Model) -> dict[str, Any]:
        return {
            "name": model.name,
            "source": self.kind,
            "recipe": model.spec["recipe"],
            "path": str(model.directory),
        }

    def lock_row(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        # Made here from the repository's own corpus: the recipe pins it.
        return {"repository": f"trained here (recipe {entry['recipe']})", "pinned": True}


SOURCE = Train()
