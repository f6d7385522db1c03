"""Routes of the operator pages."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from rollouts.dashboard import views

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="dashboard-login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard-login"), name="dashboard-logout"),
    path("fleet/", views.fleet_list, name="dashboard-fleet"),
    path("fleet/<uuid:instance_uid>/", views.agent_detail, name="dashboard-agent"),
    path("configurations/", views.configuration_list, name="dashboard-configurations"),
    path("configurations/<str:name>/", views.configuration_detail, name="dashboard-configuration"),
    path("rollouts/", views.rollout_list, name="dashboard-rollouts"),
    path("rollouts/new/", views.rollout_new, name="dashboard-rollout-new"),
    path("rollouts/<int:rollout_id>/", views.rollout_detail, name="dashboard-rollout"),
    path("certificate-requests/", views.certificate_requests, name="dashboard-certificate-requests"),
]
