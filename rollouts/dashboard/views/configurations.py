"""The configurations pages: the list with its creation form, and one configuration's page
(publish, roll back, versions with their status and a diff between two of them).
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from rollouts import selectors, services
from rollouts.config_files import ConfigValidationError
from rollouts.dashboard.views.shared import files_of, number_or, page, page_context, side_by_side


@page
def configuration_list(request: HttpRequest) -> HttpResponse:
    errors: list[str] = []
    if request.method == "POST":
        try:
            configuration = services.configuration_create(
                name=request.POST.get("name", "").strip(), selector=request.POST.get("selector", ""), actor=request.user
            )
            return redirect("dashboard-configuration", name=configuration.name)
        except DomainError as error:
            errors.append(error.message)
        except ValidationError as error:
            errors.extend(error.messages)
    return render(
        request,
        "dashboard/configurations.html",
        page_context(
            request, configurations=selectors.configuration_list().order_by("name"), errors=errors, given=request.POST
        ),
    )


@page
def configuration_detail(request: HttpRequest, name: str) -> HttpResponse:
    configuration = get_object_or_404(selectors.configuration_list(), name=name)
    errors: list[str] = []
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "publish":
                files = {
                    request.POST.get("file_name", "").strip() or "collector.yaml": {
                        "body": request.POST.get("body", "").replace("\r\n", "\n"),
                        "content_type": request.POST.get("content_type", "text/yaml"),
                    }
                }
                services.configuration_publish(
                    configuration=configuration,
                    files=files,
                    author=request.user,
                    note=request.POST.get("note", ""),
                    activate=request.POST.get("activate") == "on",
                )
            elif action == "rollback":
                services.configuration_rollback(
                    configuration=configuration,
                    to_number=number_or(request.POST.get("version"), 0) or 0,
                    author=request.user,
                )
            return redirect("dashboard-configuration", name=configuration.name)
        except DomainError as error:
            errors.append(error.message)
        except ConfigValidationError as error:
            errors.extend(error.problems)  # every problem, shown beside the form
    versions = list(selectors.version_list(configuration))
    numbers = [v.number for v in versions]
    older = number_or(request.GET.get("from"), numbers[1] if len(numbers) > 1 else None)
    newer = number_or(request.GET.get("to"), numbers[0] if numbers else None)
    by_number = {v.number: v for v in versions}
    diff = []
    if older in by_number and newer in by_number:
        diff = side_by_side(files_of(by_number[older].files), files_of(by_number[newer].files))
    current = configuration.current_version
    return render(
        request,
        "dashboard/configuration.html",
        page_context(
            request,
            configuration=configuration,
            versions=[(v, selectors.version_status_counts(v)) for v in versions],
            older=older,
            newer=newer,
            older_title=f"v{older}",
            newer_title=f"v{newer}",
            diff=diff,
            errors=errors,
            given=request.POST,
            body=request.POST.get("body")
            if errors
            else files_of(current.files).get("collector.yaml", "")
            if current
            else "",
            rollouts=configuration.rollouts.select_related("candidate_version", "stable_version")[:20],
        ),
    )
