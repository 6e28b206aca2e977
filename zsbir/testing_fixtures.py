"""pytest fixtures for zsbir's own tests and a plugin's: import them into a ``conftest.py``
(``from zsbir.testing_fixtures import isolated_cache, one_thread  # noqa: F401``) and
pytest uses them there. Both are autouse.

- :func:`isolated_cache`: every test gets its own ``ZSBIR_CACHE`` (nothing a test writes
  there reaches another test or the user's cache);
- :func:`one_thread`: torch computes on one thread during the test (tiny models run
  fastest so, and do not crawl when the machine's cores are shared), restored after.

The contract checks a plugin runs on its components are in :mod:`zsbir.testing`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["isolated_cache", "one_thread"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: Any, monkeypatch: Any) -> None:
    """Every test gets its own zsbir cache unless it sets one."""
    monkeypatch.setenv("ZSBIR_CACHE", str(tmp_path_factory.mktemp("zsbir-cache")))


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """torch on one thread for the test; the count before it is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
