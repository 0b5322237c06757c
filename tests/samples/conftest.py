"""Fixtures for the sample plugin tests (helpers are in helpers.py)."""

import pytest


@pytest.fixture
def home(tmp_path):
    """An empty QMAILHOME with control/, the plugins' working directory."""
    (tmp_path / "control").mkdir()
    return tmp_path
