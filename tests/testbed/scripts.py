"""Load one of the project's scripts as a module, to call its functions in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_script(name: str):
    """The module of ROOT/`name` (e.g. 'laion_cloudwriter.py'), freshly executed."""
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a script look their module up here
    spec.loader.exec_module(module)
    return module
