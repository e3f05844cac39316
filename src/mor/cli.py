"""The ``mor`` command line (also ``python -m mor``).

Each verb lives in its own module that provides ``add_arguments(parser)`` and
``run(args) -> dict``; the module is imported only when its verb runs. ``run`` prints what
a person reads; this entry point then prints the returned summary as the last stdout line,
one JSON object, for machines.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

VERBS = {
    "prepare": ("mor.data", "text sources -> tokenizer -> token shards"),
    "train": ("mor.train", "train a model from a YAML recipe"),
    "generate": ("mor.engine.cli", "generate text from a checkpoint"),
    "eval": ("mor.eval.cli", "validation NLL and few-shot tasks (lm-eval)"),
    "analyze": ("mor.eval.analyze", "per-token recursion depth, router histograms, depth scaling"),
    "bench": ("mor.bench", "benchmarks: `mor bench train`, `mor bench infer`"),
    "serve": ("mor.serve.cli", "OpenAI-compatible HTTP server on the continuous-batching engine"),
    "experiment": ("mor.experiment", "isoFLOP comparisons of vanilla, recursive and MoR models"),
    "export": ("mor.interop.cli", "Hugging Face transformers directory <-> mor checkpoint"),
    "import-official": ("mor.interop.official", "convert a checkpoint of the authors' MoR code into a mor checkpoint"),
}


class _VerbParser(argparse.ArgumentParser):
    """A verb's parser: a bad argument ends like any other error, with the JSON line too."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        words = self.prog.split()
        print(json.dumps({"status": "error", "verb": words[1] if len(words) > 1 else self.prog, "error": message}))
        raise SystemExit(2)


class CLIError(Exception):
    """A user error the CLI reports as one clear line (exit code 2)."""


def _known_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError

    errs: list[type[BaseException]] = [CLIError, ConfigError, CheckpointError, FileNotFoundError]
    for mod, name in (("mor.data", "DataError"), ("mor.train", "TrainError"), ("mor.engine", "RequestError"),
                      ("mor.runlock", "RunLockedError")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mor", description="Mixture-of-Recursions language models")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (mod, help_) in VERBS.items():
        sp = sub.add_parser(verb, help=help_, description=help_)
        sp.set_defaults(_module=mod)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    verb = argv[0]
    if verb not in VERBS:
        parser.print_usage(sys.stderr)
        print(f"mor: unknown verb {verb!r}; choose one of: {', '.join(VERBS)}", file=sys.stderr)
        return 2
    mod = importlib.import_module(VERBS[verb][0])
    sp = _VerbParser(prog=f"mor {verb}", description=VERBS[verb][1])
    mod.add_arguments(sp)
    # verbs with KEY=VALUE positionals accept them before or after the options
    args = sp.parse_intermixed_args(argv[1:]) if getattr(mod, "INTERMIXED_ARGS", False) else sp.parse_args(argv[1:])
    try:
        summary = mod.run(args)
    except _known_errors() as e:
        msg = str(e).strip("'\"")
        print(f"mor {verb}: error: {msg}", file=sys.stderr)
        print(json.dumps({"status": "error", "verb": verb, "error": msg}))
        return 2
    except OSError as e:  # the environment (a full disk, a path that is a file, permissions): one line
        from .validate import os_error_message

        msg = os_error_message(e)
        print(f"mor {verb}: error: {msg}", file=sys.stderr)
        print(json.dumps({"status": "error", "verb": verb, "error": msg}))
        return 2
    except KeyboardInterrupt:
        print(json.dumps({"status": "interrupted", "verb": verb}))
        return 130
    if summary is not None:
        from .runtime import to_json

        print(to_json({"status": "ok", "verb": verb, **summary}, indent=None), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
