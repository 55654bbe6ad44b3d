"""``source: finetune`` (finetuned only): fine-tuned here from the family's base, whatever that
base's source, by a recipe of ``training.finetunes``. Its record is the training run's; it is
pinned by what pins its base (the base's commit or checksum)."""

from __future__ import annotations

from typing import Any

from canopy.config.families import FinetuneSource
from canopy.sources.source import Model, ModelSource
from canopy.sources.train import TRAINING_LOG

__all__ = ["Finetune", "SOURCE"]


class Finetune(ModelSource):
    settings = FinetuneSource
    rule = "finetune_model"
    legacy_records = (TRAINING_LOG,)

    def lock_entry(self, model: Model) -> dict[str, Any]:
        record = self.made_record(model)
        base = dict(model.base_entry or {})
        recipe = model.spec["recipe"]
        return {
            "name": model.name,
            "source": self.kind,
            "repository": f"fine-tuned here from {model.family}/base (recipe {recipe})",
            "revision": recipe,
            # What pins the fine-tune is what pins its base: the base's commit or checksum.
            "commit": base.get("commit"),
            "pinned": bool(base.get("pinned")),
            "recipe": record["recipe"],
            "heldout_loss_before": record.get("heldout_loss_before"),
            "heldout_loss_after": record.get("heldout_loss_after"),
            "path": str(model.directory),
        }


SOURCE = Finetune()
