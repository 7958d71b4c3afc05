"""The lean trainer: six unified-RL scenarios on the embedded synthetic world (see `scenarios`)."""
from .config import PRESETS, SCENARIO_DEFAULTS, SCENARIOS, TrainConfig, train_preset
from .scenarios import Scenario, get_scenario
from .setup import preflight
from .trainer import Trainer

__all__ = ["TrainConfig", "PRESETS", "SCENARIO_DEFAULTS", "train_preset", "SCENARIOS", "Trainer", "Scenario",
           "get_scenario", "preflight"]
