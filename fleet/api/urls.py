from __future__ import annotations

from rest_framework.routers import DefaultRouter

from fleet.api.views import AgentViewSet

router = DefaultRouter()
router.register("agents", AgentViewSet, basename="agent")

urlpatterns = router.urls
