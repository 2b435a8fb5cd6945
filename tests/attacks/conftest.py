"""Shared by the attacks on many ids."""

from __future__ import annotations

import pytest


@pytest.fixture
def cache(tmp_path):
    """A rootfs cache of the test's own; its trees of subordinate ids are pruned when the test
    ends (tests/conftest.py, _prune_caches_of_many_ids)."""
    return tmp_path / "cache"
