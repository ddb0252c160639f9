"""The examples in the docstrings and in docs/api.md run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import tr_projections

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(tr_projections.__path__, "tr_projections.")
    if ".backends." not in m.name and "testing.strategies" not in m.name
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_api_page_examples():
    result = doctest.testfile(
        str(ROOT / "docs" / "api.md"), module_relative=False, optionflags=doctest.ELLIPSIS
    )
    assert result.attempted > 0 and result.failed == 0
