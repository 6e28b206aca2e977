"""Plugin test fixtures: every test gets its own zsbir cache; nothing is downloaded."""

from __future__ import annotations

import os

from zsbir.testing_fixtures import isolated_cache  # noqa: F401

os.environ.setdefault("HF_HUB_OFFLINE", "1")
