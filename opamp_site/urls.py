from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from fleet.views import fleet_overview
from rollouts.package_downloads import package_download

urlpatterns = [
    path("", fleet_overview, name="fleet-overview"),
    path("", include("rollouts.dashboard.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", include("fleet.api.urls")),
    path("api/v1/", include("rollouts.api.urls")),
    path("api/v1/", include("signing.api.urls")),
    path("api/v1/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    # What agents download, beside the OpAMP endpoint: the signed, expiring token in the URL
    # is the credential (rollouts.package_downloads), not a user's role.
    path("v1/package-files/<str:token>", package_download, name="package-download"),
]
