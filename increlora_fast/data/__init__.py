"""Data for `increlora-fast finetune`: offline assets, packaged tasks, GLUE and user files."""
from .assets import AssetUnavailableError, locate_asset
from .examples import Example, TaskData
from .files import load_files
from .tasks import load_task, task_names

__all__ = ["AssetUnavailableError", "locate_asset", "Example", "TaskData", "load_files",
           "load_task", "task_names"]
