"""pytest only (ComfyUI never reads this file): never import the repository root as a test package.

The root ``__init__.py`` is ComfyUI's entry point for the node pack; its relative imports need a
parent package. pytest collects the root as a Package (it holds an ``__init__.py``) and, before
the first test, imports that file to look for ``setup_module``: as a plain module (failing) or as
a package named after the checkout folder (loading the whole pack), depending on the folder's
name. Tests load the pack the way ComfyUI does instead (tests/test_nodes.py), so the root
package's setup is switched off here.
"""

from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent


def pytest_collection_modifyitems(session, config, items):
    """Make the root Package's setup a no-op (it has no setup_module to run anyway)."""
    seen = set()
    for item in items:
        node = item.parent
        while node is not None:
            if id(node) in seen:
                break
            seen.add(id(node))
            if isinstance(node, pytest.Package) and Path(node.path).resolve() == _ROOT:
                node.setup = lambda: None
                return
            node = node.parent
