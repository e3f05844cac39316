"""The remote-code bundler on a made-up package laid out like a restructured mor (a ``model``
subpackage, star imports, class-body, deferred and TYPE_CHECKING imports): the closure is
computed from the imports, the copied files import each other relatively and run."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from mor.interop.bundle import BundleError, bundle

FILES = {
    "__init__.py": "from .model import Model\n",
    "config.py": "class Config:\n    size = 3\n",
    "util.py": "def helper(x):\n    return x\n",
    "engine.py": "import a_module_that_does_not_exist\n\nclass Engine:\n    pass\n",
    "model/__init__.py": '''
        """Model."""
        from __future__ import annotations

        from typing import TYPE_CHECKING

        from ..config import Config
        from . import layers as L
        from .layers import *  # noqa: F403

        if TYPE_CHECKING:
            from ..engine import Engine


        class Model:
            from ..util import helper  # runs at import time

            def __init__(self):
                self.y = L.double(Config().size) + triple(1) + Model.helper(0)

            def serve(self) -> "Engine":
                from ..engine import Engine
                return Engine()

            def config_class(self):
                from ..config import (
                    Config as C2,
                )
                return C2
    ''',
    "model/layers.py": '''
        from ..util import helper

        __all__ = ["triple"]


        def double(x):
            return helper(2 * x)


        def triple(x):
            return 3 * x
    ''',
    "hf/__init__.py": "",
    "hf/entry.py": "from ..model import Model\n",
}


@pytest.fixture
def fake_pkg(tmp_path):
    root = tmp_path / "src" / "mor"
    for name, src in FILES.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(src).lstrip())
    return root


def test_bundle_of_a_restructured_package_runs(fake_pkg, tmp_path):
    files, block = bundle({"mor.hf.entry": "entry"}, pkg=fake_pkg)
    assert sorted(files) == ["entry.py", "mor_config.py", "mor_model.py", "mor_model_layers.py", "mor_util.py"]
    files["entry.py"] += block
    out = tmp_path / "bundled_pkg_x1"
    out.mkdir()
    (out / "__init__.py").write_text("")
    for name, src in files.items():
        (out / name).write_text(src)
    model_src = files["mor_model.py"]
    assert "from .mor_config import Config" in model_src and "from . import mor_model_layers as L" in model_src
    assert "from .mor_model_layers import *" in model_src
    sys.path.insert(0, str(tmp_path))
    try:
        entry = importlib.import_module("bundled_pkg_x1.entry")
        m = entry.Model()
        assert m.y == 9
        assert m.config_class().size == 3
        with pytest.raises(ImportError, match="mor.engine is part of the mor library"):
            m.serve()
    finally:
        sys.path.remove(str(tmp_path))
        for k in [k for k in sys.modules if k.startswith("bundled_pkg_x1")]:
            del sys.modules[k]
    # transformers copies exactly the files the entry module names (recursively)
    transformers = pytest.importorskip("transformers")
    from transformers.dynamic_module_utils import get_relative_import_files

    got = sorted(p.rsplit("/", 1)[-1] for p in get_relative_import_files(str(out / "entry.py")))
    assert got == sorted(f for f in files if f != "entry.py")


def test_unsupported_import_forms_are_named(fake_pkg):
    (fake_pkg / "util.py").write_text("import mor.config\n")
    with pytest.raises(BundleError, match=r"util.py:1: 'import mor.config' binds the package"):
        bundle({"mor.hf.entry": "entry"}, pkg=fake_pkg)
    (fake_pkg / "util.py").write_text("import os; from .config import Config\n")
    with pytest.raises(BundleError, match="own line"):
        bundle({"mor.hf.entry": "entry"}, pkg=fake_pkg)
