"""Long-context behaviour tasks (RULER-style), generated offline from a seed; see docs/tasks.md.

Importing this package registers every task in `TASKS`; `parse_tasks("passkey,niah-multikey")` builds them.
"""

from attnsparse.evaluate.tasks import niah, passkey, variables, words  # noqa: F401  (registers the tasks)
from attnsparse.evaluate.tasks.base import TASKS, Haystack, Prompter, Sample, Task, load_haystack, parse_tasks

__all__ = ["TASKS", "Haystack", "Prompter", "Sample", "Task", "load_haystack", "parse_tasks"]
