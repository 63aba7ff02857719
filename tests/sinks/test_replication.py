"""The start-up check refuses sessions whose commits would not wait for a synchronous standby."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.sinks.replication import ReplicationState, check


def _state(sync_commit: str = "on", names: str = "standby1") -> ReplicationState:
    return ReplicationState("127.0.0.1:5432", False, sync_commit, names, (("standby1", "streaming", "sync"),))


@pytest.mark.parametrize("sync_commit", ["on", "remote_write", "remote_apply"])
def test_waiting_sessions_pass(sync_commit: str):
    check(_state(sync_commit), require_sync_standby=True)


@pytest.mark.parametrize("sync_commit", ["off", "local"])
def test_sessions_that_do_not_wait_are_refused_naming_the_setting(sync_commit: str):
    with pytest.raises(ConfigError, match=rf"require_sync_standby: the session's synchronous_commit is '{sync_commit}'"):
        check(_state(sync_commit), require_sync_standby=True)


def test_no_synchronous_standby_named_is_refused():
    with pytest.raises(ConfigError, match="synchronous_standby_names is empty"):
        check(_state(names=" "), require_sync_standby=True)


def test_without_the_requirement_anything_passes():
    check(_state("off", ""), require_sync_standby=False)


def test_log_fields_name_standbys_and_their_state():
    fields = _state().log_fields()
    assert fields["standbys"] == "standby1:streaming:sync"
    assert fields["synchronous_commit"] == "on"
