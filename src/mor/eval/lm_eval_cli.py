"""lm-eval's command line with the ``mor`` model and the packaged offline tasks.

lm-eval 0.4.13 has no plugin discovery for models: its CLI resolves ``--model`` only among
its built-in models, so a model living in another package must be imported before the CLI
runs. This wrapper does that, and adds the rendered offline task folder
(:func:`mor.eval.tasks.write_task_dir`) to ``--include_path``; every other argument is
lm-eval's own::

    python -m mor.eval.lm_eval_cli --model mor --model_args pretrained=runs/demo \\
        --tasks mor_piqa,mor_arc_easy --limit 20

    python -m mor.eval.lm_eval_cli ls tasks        # also works for lm-eval's other subcommands
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .fewshot import EvalDependencyError, require_lm_eval
    from .tasks import TaskDataError, write_task_dir

    try:
        require_lm_eval()
    except EvalDependencyError as e:
        print(f"mor.eval.lm_eval_cli: error: {e}", file=sys.stderr)
        return 2
    from . import lm_eval_adapter  # noqa: F401  (registers the model "mor")

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        task_dir = str(write_task_dir())
    except TaskDataError as e:
        print(f"mor.eval.lm_eval_cli: warning: packaged tasks unavailable: {e}", file=sys.stderr)
        task_dir = None
    if task_dir is not None and argv and argv[0] not in ("-h", "--help"):
        if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            # lm-eval takes a single include folder: keep the user's, and say how to add ours
            print("mor.eval.lm_eval_cli: note: --include_path given, so the packaged tasks are not added; "
                  "copy them into your folder with `python -m mor.eval.tasks FOLDER`", file=sys.stderr)
        else:
            argv += ["--include_path", task_dir]
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except Exception as e:  # a bad checkpoint or value of ours: one line, not lm-eval's traceback
        from ..checkpoint import CheckpointError
        from ..config import ConfigError

        if not isinstance(e, (CheckpointError, ConfigError)):
            raise
        print(f"mor.eval.lm_eval_cli: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
