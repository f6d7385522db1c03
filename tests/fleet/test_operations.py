from __future__ import annotations

import gc
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from fleet.tasks import sweep_stale_connections
from opamp import runtime
from opamp.runtime import PureProtobufBackend, require_upb, tune_gc_for_connections
from tests.fleet.factories import AgentFactory


def test_the_server_runs_on_the_upb_protobuf_backend():
    assert runtime.protobuf_backend() == "upb"
    require_upb()


def test_start_up_refuses_the_pure_python_protobuf_backend(monkeypatch):
    monkeypatch.setattr(runtime, "protobuf_backend", lambda: "python")
    with pytest.raises(PureProtobufBackend, match="pure-Python backend"):
        require_upb()


def test_gc_tuning_sets_the_thresholds_and_freezes_survivors_only_when_asked():
    before = gc.get_threshold()
    freeze = runtime.freeze_after_older_collections
    assert freeze not in gc.callbacks  # the test settings leave it off
    try:
        tune_gc_for_connections((100000, 50, 1000), freeze_survivors=False)
        assert gc.get_threshold() == (100000, 50, 1000)
        assert freeze not in gc.callbacks
        tune_gc_for_connections((10000, 5, 1000), freeze_survivors=True)
        tune_gc_for_connections((10000, 5, 1000), freeze_survivors=True)
        assert gc.get_threshold() == (10000, 5, 1000)
        assert gc.callbacks.count(freeze) == 1  # installed once, however often tuned
    finally:
        while freeze in gc.callbacks:
            gc.callbacks.remove(freeze)
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.django_db
def test_the_sweep_marks_silent_connected_agents_disconnected():
    silent = AgentFactory(last_seen=timezone.now() - timedelta(hours=1))
    alive = AgentFactory()
    assert sweep_stale_connections() == 1
    silent.refresh_from_db()
    alive.refresh_from_db()
    assert silent.connected is False and silent.disconnected_at is not None
    assert alive.connected is True


@pytest.mark.django_db
def test_periodic_tasks_are_registered_by_command_idempotently():
    call_command("register_periodic_tasks")
    call_command("register_periodic_tasks")
    task = PeriodicTask.objects.get(task="fleet.tasks.sweep_stale_connections")
    assert task.enabled and task.interval.every == 30


@pytest.mark.django_db
def test_ensure_admin_creates_the_login_once_and_prints_it(tmp_path, settings, capsys):
    settings.VAR_DIR = tmp_path
    call_command("ensure_admin")
    first = capsys.readouterr().out
    call_command("ensure_admin")
    second = capsys.readouterr().out
    assert "admin login: admin / " in first
    assert first == second
    assert (tmp_path / "admin-password").stat().st_mode & 0o777 == 0o600
