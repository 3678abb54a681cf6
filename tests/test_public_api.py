"""The package's public API: every name in ``embeddistill.__all__`` imports, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

import embeddistill


def test_all_lists_every_export_once():
    assert len(embeddistill.__all__) == len(set(embeddistill.__all__))
    assert set(embeddistill.__all__) == {"__version__", *embeddistill._EXPORTS}


@pytest.mark.parametrize("name", embeddistill.__all__)
def test_every_public_name_imports(name):
    value = getattr(embeddistill, name)
    assert value is not None
    assert getattr(value, "__name__", name) == name  # the object itself, not a module of the same name


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        embeddistill.nope  # noqa: B018


def test_import_loads_no_heavy_module():
    """``import embeddistill`` (and so the CLI's start) must not pull in torch, transformers or numpy."""
    code = "import sys, embeddistill; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert loaded == "[]"
