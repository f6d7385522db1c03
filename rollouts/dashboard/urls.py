"""Routes of the operator pages."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from rollouts.dashboard.views.agent import agent_detail
from rollouts.dashboard.views.certificates import certificate_requests
from rollouts.dashboard.views.configurations import configuration_detail, configuration_list
from rollouts.dashboard.views.fleet import fleet_list
from rollouts.dashboard.views.rollouts import rollout_detail, rollout_list, rollout_new

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="dashboard/login.html"), name="dashboard-login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard-login"), name="dashboard-logout"),
    path("fleet/", fleet_list, name="dashboard-fleet"),
    path("fleet/<uuid:instance_uid>/", agent_detail, name="dashboard-agent"),
    path("configurations/", configuration_list, name="dashboard-configurations"),
    path("configurations/<str:name>/", configuration_detail, name="dashboard-configuration"),
    path("rollouts/", rollout_list, name="dashboard-rollouts"),
    path("rollouts/new/", rollout_new, name="dashboard-rollout-new"),
    path("rollouts/<int:rollout_id>/", rollout_detail, name="dashboard-rollout"),
    path("certificate-requests/", certificate_requests, name="dashboard-certificate-requests"),
]
