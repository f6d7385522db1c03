"""Routes of the configurations API, mounted at /api/v1/ beside the fleet inventory.

`agents/<uuid>/labels/` and `agents/<uuid>/config/` are explicit paths: the fleet router
owns `agents/` and `agents/<uuid>/`, and these only extend an agent's URL.
"""

from __future__ import annotations

from django.urls import path
from rest_framework.routers import SimpleRouter

from rollouts.api import packages, rollout_views, views

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
    path("packages/", packages.PackageListView.as_view(), name="package-list"),
    path("packages/<str:name>/", packages.PackageDetailView.as_view(), name="package-detail"),
    path("packages/<str:name>/status/", packages.PackageStatusView.as_view(), name="package-status"),
    path("packages/<str:name>/versions/", packages.PackageVersionListView.as_view(), name="package-version-list"),
    path(
        "packages/<str:name>/versions/<str:version>/",
        packages.PackageVersionDetailView.as_view(),
        name="package-version-detail",
    ),
    path(
        "packages/<str:name>/versions/<str:version>/files/",
        packages.PackageFileUploadView.as_view(),
        name="package-file-list",
    ),
    path("package-assignments/", packages.AssignmentListView.as_view(), name="package-assignment-list"),
    path("package-assignments/<str:name>/", packages.AssignmentDetailView.as_view(), name="package-assignment-detail"),
]
