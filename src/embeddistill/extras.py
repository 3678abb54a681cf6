"""Optional dependencies: a missing one ends in "install embeddistill[EXTRA]", not a raw ``ModuleNotFoundError``.

``export``, ``serve`` and searching with an ONNX export need the ``serve`` extra (fastapi, uvicorn, onnx,
onnxruntime); generating queries from a GGUF file needs ``lm``. Each entry point calls :func:`require` before it
loads anything, so the answer comes at once and names every missing package.
"""

from __future__ import annotations

import importlib
import importlib.util

EXTRAS = {
    "serve": ("fastapi", "uvicorn", "pydantic", "onnx", "onnxruntime"),
    "lm": ("gguf", "accelerate"),
    "hub": ("datasets",),
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(extra: str, *modules: str, purpose: str) -> None:
    """Raise :class:`MissingExtra` naming ``purpose`` and the extra unless every module (default: the extra's) imports.

    Importing (not merely finding) the modules is what catches a half-installed package.
    """
    missing = [module for module in modules or EXTRAS[extra] if not _installed(module)]
    if missing:
        raise MissingExtra(
            f"{purpose} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'embeddistill[{extra}]'"
        )
