"""Fixtures of the WebUI API tests: the tiny SD1 host (one per module) and ``api``, which builds run managers behind
FastAPI's TestClient and closes them after the test."""

from __future__ import annotations

import pytest

from tests.integration.webui_api.stand_ins import api_servers, tiny_host


@pytest.fixture(scope="module")
def host():
    return tiny_host()


@pytest.fixture
def api(host):
    """``api(**manager_options) -> (client, manager)``; every manager is closed after the test."""
    with api_servers(host) as build:
        yield build
