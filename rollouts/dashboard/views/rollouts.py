"""The rollouts pages: the list, the creation form (with its dry run), and one rollout's
page (its live progress, the failure-rate chart, the verbs).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from rollouts import selectors
from rollouts.dashboard.progress import rollout_progress
from rollouts.dashboard.views.shared import number_or, page, page_context
from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, ConfigVersion, Rollout, RolloutState
from rollouts.rollout_services import creation, verbs

VERBS = ("start", "pause", "resume", "promote", "abort", "retry")
DEFAULT_STAGES = [
    {"size": "1", "unit": "percent", "hold": "60", "approval": False},
    {"size": "10", "unit": "percent", "hold": "60", "approval": False},
    {"size": "100", "unit": "percent", "hold": "0", "approval": False},
]
BAD_STAGE_ROW = "stage {index}: the size must be a number"


@page
def rollout_list(request: HttpRequest) -> HttpResponse:
    rollouts = Rollout.objects.select_related(*ROLLOUT_SUBJECT_RELATIONS)[:100]
    return render(request, "dashboard/rollouts.html", page_context(request, rollouts=rollouts))


def _stage_rows(post: Any) -> list[dict[str, Any]]:
    sizes, units, holds = post.getlist("stage_size"), post.getlist("stage_unit"), post.getlist("stage_hold")
    approvals = set(post.getlist("stage_approval"))
    return [
        {"size": size, "unit": unit, "hold": hold, "approval": str(index) in approvals}
        for index, (size, unit, hold) in enumerate(zip(sizes, units, holds, strict=False))
    ]


def _stage_specs(rows: list[dict[str, Any]]) -> list[creation.StageSpec]:
    specs = []
    for index, row in enumerate(rows):
        try:
            size = float(row["size"])
            hold = float(row["hold"] or 0)
        except ValueError:
            raise DomainError(BAD_STAGE_ROW.format(index=index), field="stages") from None
        if row["unit"] == "count":
            if size != int(size):
                raise DomainError(creation.STAGE_SIZE.format(index=index), field="stages")
            specs.append(creation.StageSpec(count=int(size), hold_seconds=hold, requires_approval=row["approval"]))
        else:
            specs.append(creation.StageSpec(percent=size, hold_seconds=hold, requires_approval=row["approval"]))
    return specs


@page
def rollout_new(request: HttpRequest) -> HttpResponse:
    configurations = list(selectors.configuration_list().order_by("name"))
    post = request.POST if request.method == "POST" else None
    rows = _stage_rows(post) if post is not None else DEFAULT_STAGES
    chosen = (post.get("configuration") if post else request.GET.get("configuration")) or (
        configurations[0].name if configurations else ""
    )
    configuration = next((c for c in configurations if c.name == chosen), None)
    candidates: list[ConfigVersion] = []
    if configuration is not None:
        candidates = [v for v in selectors.version_list(configuration) if v.pk != configuration.current_version_id]
    errors: list[str] = []
    preview = None
    if post is not None and configuration is not None:
        try:
            specs = _stage_specs(rows)
            salt = post.get("salt", "").strip() or None
            if post.get("action") == "create":
                candidate = configuration.versions.filter(number=number_or(post.get("candidate"), 0) or 0).first()
                if candidate is None:
                    raise DomainError("choose the candidate version", field="candidate")
                rollout = creation.rollout_create(
                    configuration=configuration,
                    candidate=candidate,
                    stages=specs,
                    actor=request.user,
                    max_failure_rate=float(post.get("max_failure_percent", "0.1") or 0) / 100,
                    apply_timeout_seconds=float(post.get("apply_timeout", "300") or 300),
                    salt=salt,
                    note=post.get("note", ""),
                )
                return redirect("dashboard-rollout", rollout_id=rollout.pk)
            preview = creation.rollout_dry_run(configuration=configuration, stages=specs, salt=salt)
        except (DomainError, ValueError) as error:
            errors.append(error.message if isinstance(error, DomainError) else str(error))
    return render(
        request,
        "dashboard/rollout_new.html",
        page_context(
            request,
            configurations=configurations,
            configuration=configuration,
            candidates=candidates,
            rows=rows,
            errors=errors,
            preview=preview,
            given=post or {},
        ),
    )


@page
def rollout_detail(request: HttpRequest, rollout_id: int) -> HttpResponse:
    get_object_or_404(Rollout, pk=rollout_id)
    errors: list[str] = []
    if request.method == "POST":
        rollout = Rollout.objects.get(pk=rollout_id)
        verb = request.POST.get("verb", "")
        try:
            if verb == "approve":
                done = verbs.rollout_approve_stage(
                    rollout=rollout, stage_index=number_or(request.POST.get("stage"), -1) or 0, actor=request.user
                )
            elif verb in VERBS:
                done = getattr(verbs, f"rollout_{verb}")(rollout=rollout, actor=request.user)
            else:
                raise DomainError(f"unknown verb {verb!r}")
            if not done:
                raise DomainError(verbs.LOST_RACE.format(rollout_id=rollout.pk), status=409)
            return redirect("dashboard-rollout", rollout_id=rollout.pk)
        except DomainError as error:
            errors.append(error.message)
    progress = rollout_progress(rollout_id)
    context = page_context(
        request,
        progress=progress,
        rollout=progress.rollout,
        errors=errors,
        verbs=_verbs(progress.rollout),
        chart=_chart(progress),
    )
    if request.GET.get("fragment"):
        return render(request, "dashboard/rollout_live.html", context)
    return render(request, "dashboard/rollout.html", context)


def _verbs(rollout: Rollout) -> list[str]:
    """The verbs that make sense in the rollout's state (the verb itself still decides)."""
    state = rollout.state
    return {
        RolloutState.DRAFT: ["start", "abort"],
        RolloutState.RUNNING: ["pause", "promote", "abort"],
        RolloutState.PAUSED: ["resume", "promote", "abort"],
        RolloutState.ROLLED_BACK: ["retry"],
        RolloutState.ABORTED: ["retry"],
    }.get(RolloutState(state), [])


def _chart(progress: Any) -> dict[str, Any]:
    """An inline SVG polyline of the failure rate over time (tick samples and decisions), against the budget."""
    points = progress.budget_series
    width, height = 400, 80
    top = max([p["rate"] for p in points] + [progress.budget * 2, progress.failure_rate, 1e-6])
    line = ""
    if points:
        start: datetime = points[0]["at"]
        span = max((points[-1]["at"] - start).total_seconds(), 1.0)
        line = " ".join(
            f"{width * (p['at'] - start).total_seconds() / span:.1f},{height - height * p['rate'] / top:.1f}"
            for p in points
        )
    return {
        "width": width,
        "height": height,
        "line": line,
        "points": len(points),
        "budget_y": height - height * progress.budget / top,
    }
