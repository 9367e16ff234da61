"""Use cases: prompt generators with reference answers, and the checkers that score answers."""

from services.tasks.base import Problem, Task, get_task, task_names

__all__ = ["Problem", "Task", "get_task", "task_names"]
