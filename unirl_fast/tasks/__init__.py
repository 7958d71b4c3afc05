"""Task sources: the prompts (and source images, reference answers, reward metadata) a run trains and evaluates on.

    load_tasks("world" | "prompts.jsonl" | "prompts.csv" | "dataset_dir", scenario) -> TaskSet(train, eval)

Every source yields tasks with the same attributes (`Task`), the embedded world included; see `sources` for the
file formats and the split rule.
"""
from .base import DatasetImage, Task, TaskSet, load_image
from .sources import EVAL_SPLITS, load_tasks

__all__ = ["DatasetImage", "Task", "TaskSet", "load_image", "load_tasks", "EVAL_SPLITS"]
