"""The feature store's settings of `rankserve serve`: the same REDIS_* variables the command-line
tools read, and `--redis-url` read as REDIS_URL is (validated, with the cluster nodes)."""

from __future__ import annotations

import argparse
import os

import pytest
from pydantic import ValidationError

from service.server import settings_from_args
from service.settings import Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the store and server variables of the machine running the tests go."""
    for name in [n for n in os.environ if n.startswith(("REDIS_", "RANKSERVE_"))]:
        monkeypatch.delenv(name)


def test_redis_mode_is_read_as_the_tools_read_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6379/0")
    monkeypatch.setenv("REDIS_MODE", "single")
    monkeypatch.setenv("REDIS_CLUSTER_NODES", "10.0.0.1:6379,10.0.0.2:6379")
    assert Settings().feature_store.resolved_mode() == "single"  # without REDIS_MODE: cluster
    monkeypatch.delenv("REDIS_MODE")
    assert Settings().feature_store.resolved_mode() == "cluster"


def test_the_redis_url_flag_is_validated_and_keeps_the_other_store_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKSERVE_FEATURE_STORE__POOL_SIZE", "7")
    settings = settings_from_args(argparse.Namespace(redis_url="redis://10.0.0.1:6379/0"))
    assert (settings.feature_store.url, settings.feature_store.pool_size) == ("redis://10.0.0.1:6379/0", 7)
    with pytest.raises(ValidationError, match="url must start with"):
        settings_from_args(argparse.Namespace(redis_url="10.0.0.1:6379"))


def test_variables_that_name_no_setting_are_listed() -> None:
    from service.settings import unknown_variables

    env = {"RANKSERVE_WORKER": "2", "RANKSERVE_WORKERS": "2", "RANKSERVE_FEATURE_STORE__POOL_SIZE": "8",
           "RANKSERVE_FEATURE_STOR__POOL_SIZE": "8", "RANKSERVE_CONFIG": "x.yaml", "RANKSERVE_DATA_ROOT": "d",
           "REDIS_URL": "redis://h:1/0"}
    assert unknown_variables(env) == ["RANKSERVE_FEATURE_STOR__POOL_SIZE", "RANKSERVE_WORKER"]
