"""``mor export SRC OUT``: a mor checkpoint -> a Hugging Face transformers directory (``--format
hf``, the default for mor checkpoints), or a transformers Llama directory (or a `mor export`) -> a mor checkpoint
(``--format mor``, the default when SRC is such a directory)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .hf_export import FORMATS, ExportError, export_hf, import_hf


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="mor checkpoint or run directory (or a transformers Llama / `mor export` directory)")
    p.add_argument("out", help="output directory (must not exist or be empty, unless --force)")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="hf: transformers directory (default for a mor checkpoint); "
                        "mor: mor checkpoint (default for a transformers directory)")
    p.add_argument("--routing", choices=("topk", "threshold"), default="topk",
                   help="expert-choice rule the exported forward uses by default (generation always uses "
                        "the causal threshold rule); default topk, as `mor eval`")
    p.add_argument("--force", action="store_true", help="replace OUT if it is a non-empty directory")


def _is_hf_dir(src: Path) -> bool:
    """A transformers directory (a Llama, or a ``mor export``), not a mor checkpoint."""
    f = src / "config.json"
    if not f.is_file():
        return False
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(d, dict) and (d.get("model_type") == "llama" or "auto_map" in d)


def run(args: argparse.Namespace) -> dict:
    src = Path(args.src)
    fmt = args.format or ("mor" if _is_hf_dir(src) else "hf")
    if fmt == "mor":
        if not _is_hf_dir(src) and (src / "meta.json").exists():
            raise ExportError(f"{src} is already a mor checkpoint; --format mor converts a transformers directory")
        out = import_hf(src, args.out, overwrite=args.force)
    else:
        if _is_hf_dir(src):
            raise ExportError(f"{src} is already a transformers directory; use --format mor to convert it")
        out = export_hf(src, args.out, routing=args.routing, overwrite=args.force)
    files = sorted(p.name for p in Path(out).iterdir())
    print(f"wrote {out} ({fmt}): {', '.join(files)}")
    return {"out": str(out), "format": fmt, "files": files}
