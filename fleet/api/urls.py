from __future__ import annotations

from django.urls import path
from rest_framework.routers import DefaultRouter

from fleet.api.command_views import (
    AgentCustomMessagesView,
    AgentRestartView,
    CommandViewSet,
    CustomMessagesView,
    SelectorRestartView,
)
from fleet.api.telemetry_settings_views import TelemetrySettingsViewSet
from fleet.api.views import AgentViewSet, AuditEventViewSet

router = DefaultRouter()
router.register("agents", AgentViewSet, basename="agent")
router.register("audit", AuditEventViewSet, basename="audit-event")
router.register("commands", CommandViewSet, basename="command")
router.register("telemetry-settings", TelemetrySettingsViewSet, basename="telemetry-settings")

# Before the router's routes: "commands/restart/" is not a command's id.
urlpatterns = [
    path("agents/<uuid:instance_uid>/restart/", AgentRestartView.as_view(), name="agent-restart"),
    path(
        "agents/<uuid:instance_uid>/custom-messages/", AgentCustomMessagesView.as_view(), name="agent-custom-messages"
    ),
    path("commands/restart/", SelectorRestartView.as_view(), name="command-restart"),
    path("custom-messages/", CustomMessagesView.as_view(), name="custom-messages"),
    *router.urls,
]
