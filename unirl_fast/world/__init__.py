"""The embedded synthetic world: coloured shapes at positions and counts, prompts (plain and needing
reasoning), edit instructions, questions, and GenEval-style verifiers. No downloads."""
from .render import COLORS, REGIONS, SHAPES, Obj, Scene, render_scene
from .tasks import (
                    Req,
                    Task,
                    describe,
                    edit_tasks,
                    generation_tasks,
                    is_edit_instruction,
                    parse_description,
                    scene_of,
                    split_of,
                    understanding_tasks,
)
from .verify import Detection, check_image, detect, score_image

__all__ = [
    "COLORS", "REGIONS", "SHAPES", "Obj", "Scene", "render_scene", "Req", "Task", "describe", "edit_tasks",
    "generation_tasks", "is_edit_instruction", "parse_description", "scene_of", "split_of", "understanding_tasks",
    "Detection", "check_image", "detect",
    "score_image",
]
