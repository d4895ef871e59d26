"""`apogee pretrain`: the pre-training stage, the engine's core loop with nothing added."""
from __future__ import annotations

from engine.stage import Stage


class PretrainStage(Stage):
    """Next-token prediction on the pre-training blend (data.inputs, data.weights, data.phases)."""

    name = "pretrain"
    help = "pre-train a model"
