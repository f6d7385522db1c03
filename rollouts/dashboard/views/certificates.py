"""The certificate request queue: approve or reject pending requests, and the recent decisions."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from rollouts.dashboard.views.shared import number_or, page, page_context
from signing import certificates as signing_certificates
from signing import selectors as signing_selectors
from signing.models import CertificateRequest


@page
def certificate_requests(request: HttpRequest) -> HttpResponse:
    errors: list[str] = []
    if request.method == "POST":
        pending = get_object_or_404(CertificateRequest, pk=number_or(request.POST.get("request"), 0))
        try:
            if request.POST.get("decision") == "approve":
                signing_certificates.certificate_request_approve(request=pending, actor=request.user)
            else:
                signing_certificates.certificate_request_reject(
                    request=pending, actor=request.user, reason=request.POST.get("reason", "")
                )
            return redirect("dashboard-certificate-requests")
        except DomainError as error:
            errors.append(error.message)
    return render(
        request,
        "dashboard/certificate_requests.html",
        page_context(
            request,
            pending=signing_selectors.pending_certificate_requests()[:200],
            decided=signing_selectors.certificate_request_list().exclude(state=CertificateRequest.State.PENDING)[:50],
            errors=errors,
        ),
    )
