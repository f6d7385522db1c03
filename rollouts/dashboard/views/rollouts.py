"""The rollouts pages: the list, the creation form of a configuration's or a package's
rollout (with its dry run; drafts through the services the API calls), and one rollout's
page (its live progress, the failure-rate chart, the verbs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render

from fleet.errors import DomainError
from rollouts import selectors
from rollouts.dashboard.progress import rollout_progress
from rollouts.dashboard.views.shared import number_or, page, page_context
from rollouts.errors import NO_SUCH_VERSION
from rollouts.models import ROLLOUT_SUBJECT_RELATIONS, Configuration, Package, PackageVersion, Rollout, RolloutState
from rollouts.packages import package_version_named
from rollouts.rollout_services import creation, verbs

VERBS = ("start", "pause", "resume", "promote", "abort", "retry")
DEFAULT_STAGES = [
    {"size": "1", "unit": "percent", "hold": "60", "approval": False},
    {"size": "10", "unit": "percent", "hold": "60", "approval": False},
    {"size": "100", "unit": "percent", "hold": "0", "approval": False},
]
BAD_STAGE_ROW = "stage {index}: the size must be a number"
BAD_POLICY = "the failure budget, the apply timeout and the minimum of reports must be numbers"
NO_CANDIDATE = "choose the candidate version"
CONFIGURATION, PACKAGE = "configuration", "package"


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
            if not math.isfinite(size):
                raise ValueError(row["size"])
        except ValueError:
            raise DomainError(BAD_STAGE_ROW.format(index=index), field="stages") from None
        if row["unit"] == "count":
            if size != int(size):
                raise DomainError(creation.STAGE_SIZE.format(index=index), field="stages")
            specs.append(creation.StageSpec(count=int(size), hold_seconds=hold, requires_approval=row["approval"]))
        else:
            specs.append(creation.StageSpec(percent=size, hold_seconds=hold, requires_approval=row["approval"]))
    return specs


@dataclass
class Subject:
    """What the form rolls out: a configuration or a package, the names to choose from, the
    chosen one's candidate versions (value, label) and the version it rolls out from."""

    kind: str
    names: list[str]
    chosen: Configuration | Package | None
    candidates: list[tuple[str, str]] = field(default_factory=list)
    stable: str = ""


def _configuration_subject(chosen: str) -> Subject:
    configurations = list(selectors.configuration_list().order_by("name"))
    # Nothing chosen yet: the first; a name that is not there: none (never another one's rollout).
    chosen = chosen or (configurations[0].name if configurations else "")
    configuration = next((c for c in configurations if c.name == chosen), None)
    subject = Subject(CONFIGURATION, [c.name for c in configurations], configuration)
    if configuration is not None:
        subject.candidates = [
            (str(v.number), f"v{v.number} {v.note}".strip())
            for v in selectors.version_list(configuration)
            if v.pk != configuration.current_version_id
        ]
        current = configuration.current_version
        subject.stable = f"v{current.number}" if current is not None else "?"
    return subject


def _package_subject(chosen: str) -> Subject:
    names = list(Package.objects.order_by("name").values_list("name", flat=True))
    package = Package.objects.filter(name=chosen or (names[0] if names else "")).first()
    subject = Subject(PACKAGE, names, package)
    if package is not None:
        # The service refuses a package with no single stable version; the form still lists
        # every version so that the refusal is shown when it is tried.
        stable = list(
            PackageVersion.objects.filter(pk__in=package.assignments.values("version_id")).values_list(
                "version", flat=True
            )
        )
        subject.stable = ", ".join(sorted(stable)) or "no assigned version"
        subject.candidates = [
            (v.version, f"{v.version} {v.note}".strip()) for v in package.versions.all() if v.version not in stable
        ]
    return subject


def _policy(post: Any) -> dict[str, Any]:
    """The gate's settings as the form gives them; the service refuses what is out of range."""
    try:
        return {
            "max_failure_rate": float(post.get("max_failure_percent", "0.1") or 0) / 100,
            "apply_timeout_seconds": float(post.get("apply_timeout", "300") or 300),
            "min_reporting": int(post.get("min_reporting", "1") or 1),
            "auto_rollback": post.get("on_breach", "rollback") != "pause",
            "salt": post.get("salt", "").strip() or None,
            "note": post.get("note", ""),
        }
    except ValueError:
        raise DomainError(BAD_POLICY) from None


def _create(subject: Subject, post: Any, specs: list[creation.StageSpec], actor: Any) -> Rollout:
    """The draft, through the service the API calls (the same refusals)."""
    candidate = post.get("candidate", "")
    if not candidate:
        raise DomainError(NO_CANDIDATE, field="candidate")
    if isinstance(subject.chosen, Package):
        return creation.package_rollout_create(
            package=subject.chosen,
            candidate=package_version_named(subject.chosen, candidate, field="candidate"),
            stages=specs,
            actor=actor,
            **_policy(post),
        )
    assert isinstance(subject.chosen, Configuration)
    version = subject.chosen.versions.filter(number=number_or(candidate, 0) or 0).first()
    if version is None:
        raise DomainError(NO_SUCH_VERSION.format(name=subject.chosen.name, number=candidate), field="candidate")
    return creation.rollout_create(
        configuration=subject.chosen, candidate=version, stages=specs, actor=actor, **_policy(post)
    )


@page
def rollout_new(request: HttpRequest) -> HttpResponse:
    post = request.POST if request.method == "POST" else None
    given = post if post is not None else request.GET
    if given.get("kind") == PACKAGE:
        subject = _package_subject(given.get("package", ""))
    else:
        subject = _configuration_subject(given.get("configuration", ""))
    rows = _stage_rows(post) if post is not None else DEFAULT_STAGES
    errors: list[str] = []
    preview = None
    if post is not None and subject.chosen is not None:
        try:
            specs = _stage_specs(rows)
            if post.get("action") == "create":
                rollout = _create(subject, post, specs, request.user)
                return redirect("dashboard-rollout", rollout_id=rollout.pk)
            salt = post.get("salt", "").strip() or None
            if isinstance(subject.chosen, Package):
                preview = creation.rollout_dry_run(package=subject.chosen, stages=specs, salt=salt)
            else:
                preview = creation.rollout_dry_run(configuration=subject.chosen, stages=specs, salt=salt)
        except DomainError as error:
            errors.append(error.message)
    return render(
        request,
        "dashboard/rollout_new.html",
        page_context(request, subject=subject, rows=rows, errors=errors, preview=preview, given=post or {}),
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
