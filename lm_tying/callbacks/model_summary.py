"""Lightning's model summary without the columns and rows that say nothing here."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    LEFTOVER_PARAMS_NAME,
    get_formatted_model_size,
    get_human_readable_count,
)
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class CompactModelSummary(ModelSummary):
    """The model summary as a table of name, type and parameters: no FLOPs column when nothing was counted (Lightning
    counts FLOPs only for an ``example_input_array``), no train/eval mode column, and the parameters a model holds
    directly (word2vec's embedding tables) named instead of an "other params n/a" row."""

    def __init__(self, max_depth: int = 1) -> None:
        """
        Args:
            max_depth: How deep to list submodules (0: no summary).
        """
        super().__init__(max_depth=max_depth)
        self._own_parameters: list[str] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._own_parameters = [name for name, _ in pl_module.named_parameters(recurse=False)]
        super().on_fit_start(trainer, pl_module)

    def summarize(
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = {name: list(values) for name, values in summary_data if name not in (" ", "Mode")}
        if not total_flops:
            columns.pop("FLOPs", None)
        names = columns.get("Name", [])
        if LEFTOVER_PARAMS_NAME in names:
            row = names.index(LEFTOVER_PARAMS_NAME)
            for name, values in columns.items():
                if name != "Params":
                    values[row] = "-"
            names[row] = ", ".join(self._own_parameters) or LEFTOVER_PARAMS_NAME
            columns["Type"][row] = "Parameter"
        widths = {name: max(len(name), *(len(v) for v in values)) for name, values in columns.items()}
        lines = [" | ".join(name.ljust(widths[name]) for name in columns)]
        lines.append("-" * len(lines[0]))
        for row in range(len(names)):
            lines.append(" | ".join(values[row].ljust(widths[name]) for name, values in columns.items()))
        frozen = total_parameters - trainable_parameters
        lines.append(
            f"{get_human_readable_count(total_parameters).strip()} parameters "
            f"({get_human_readable_count(frozen).strip()} frozen), {get_formatted_model_size(model_size)} MB"
            + (f", {get_human_readable_count(total_flops).strip()} FLOPs" if total_flops else "")
        )
        rank_zero_info("\n".join(lines))

