"""``python -m mor.eval.tasks [FOLDER]``: render the offline task YAMLs, print the folder."""

import sys

from . import TaskDataError, write_task_dir

try:
    print(write_task_dir(sys.argv[1] if len(sys.argv) > 1 else None))
except TaskDataError as e:
    print(f"mor.eval.tasks: error: {e}", file=sys.stderr)
    raise SystemExit(2)
