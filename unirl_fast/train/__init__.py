"""The lean trainer: six unified-RL scenarios on the embedded synthetic world (see `scenarios`)."""
from .config import PRESETS, SCENARIOS, TrainConfig
from .scenarios import Scenario, get_scenario
from .trainer import Trainer

__all__ = ["TrainConfig", "PRESETS", "SCENARIOS", "Trainer", "Scenario", "get_scenario"]
