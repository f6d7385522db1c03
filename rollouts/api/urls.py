"""Routes of the configurations API, mounted at /api/v1/ beside the fleet inventory.

`agents/<uuid>/labels/` and `agents/<uuid>/config/` are explicit paths: the fleet router
owns `agents/` and `agents/<uuid>/`, and these only extend an agent's URL.
"""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from rollouts.api import rollout_views, views

router = SimpleRouter()
router.register("configurations", views.ConfigurationViewSet, basename="configuration")
router.register("rollouts", rollout_views.RolloutViewSet, basename="rollout")

versions = views.ConfigVersionViewSet

urlpatterns = [
    *router.urls,
    path(
        "configurations/<str:name>/versions/",
        versions.as_view({"get": "list", "post": "create"}),
        name="config-version-list",
    ),
    path(
        "configurations/<str:name>/versions/<int:number>/",
        versions.as_view({"get": "retrieve"}),
        name="config-version-detail",
    ),
    path(
        "configurations/<str:name>/versions/<int:number>/status/",
        versions.as_view({"get": "status_counts"}),
        name="config-version-status",
    ),
    path("desired-state/reconciler/", views.ReconcilerStateView.as_view(), name="desired-state-reconciler"),
    path("selectors/preview/", views.SelectorPreviewView.as_view(), name="selector-preview"),
    path("agents/<uuid:instance_uid>/labels/", views.AgentLabelsView.as_view(), name="agent-labels"),
    path("agents/<uuid:instance_uid>/config/", views.AgentConfigView.as_view(), name="agent-config"),
]
