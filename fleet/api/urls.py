from __future__ import annotations

from rest_framework.routers import DefaultRouter

from fleet.api.views import AgentViewSet, AuditEventViewSet

router = DefaultRouter()
router.register("agents", AgentViewSet, basename="agent")
router.register("audit", AuditEventViewSet, basename="audit-event")

urlpatterns = router.urls
