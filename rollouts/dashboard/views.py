"""Operator pages: fleet, agent, configurations, rollouts, certificate requests.

Thin over the selectors and services the API uses. Every page needs a role that can read
(viewer, operator, staff); every POST needs the operator role and is refused with 403
otherwise, whether or not the page showed a button. Live parts are HTML fragments the page
polls (`?fragment=1`), so nothing needs a front-end build.
"""

from __future__ import annotations

import contextlib
import difflib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Case, F, Q, QuerySet, TextField, Value, When
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.dateparse import parse_datetime

from fleet import agent_labels
from fleet import selectors as fleet_selectors
from fleet.errors import DomainError
from fleet.label_selectors import SelectorError, parse_selector
from fleet.models import Agent, RemoteConfigState, Transport
from fleet.roles import READ_DENIED, WRITE_DENIED, can_read, can_write
from fleet.selector_queries import selector_q
from rollouts import resend, selectors, services
from rollouts.config_files import ConfigValidationError
from rollouts.dashboard.progress import rollout_progress
from rollouts.models import Configuration, ConfigVersion, Rollout, RolloutState
from rollouts.rollout_services import creation, verbs
from signing import selectors as signing_selectors
from signing import services as signing_services
from signing.models import CertificateRequest, IssuedCertificate

PAGE_SIZE = 50
CONFIG_STATES = {
    "applied": RemoteConfigState.APPLIED,
    "applying": RemoteConfigState.APPLYING,
    "failed": RemoteConfigState.FAILED,
    "none": RemoteConfigState.UNSET,
}
HEALTH = {"healthy": Q(healthy=True), "unhealthy": Q(healthy=False), "unknown": Q(healthy__isnull=True)}
SEARCHED_LABELS = ("service.name", "service.instance.id", "host.name")
VERBS = ("start", "pause", "resume", "promote", "abort", "retry")
DEFAULT_STAGES = [
    {"size": "1", "unit": "percent", "hold": "60", "approval": False},
    {"size": "10", "unit": "percent", "hold": "60", "approval": False},
    {"size": "100", "unit": "percent", "hold": "0", "approval": False},
]
BAD_CURSOR = "the page link is out of date; start again from the first page"
BAD_STAGE_ROW = "stage {index}: the size must be a number"


View = Callable[..., HttpResponseBase]


def page(view: View) -> View:
    """Log in first; reading needs a role; any POST needs the operator role (403 otherwise)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path(), reverse("dashboard-login"))
        if not can_read(request.user):
            raise PermissionDenied(READ_DENIED)
        if request.method == "POST" and not can_write(request.user):
            raise PermissionDenied(WRITE_DENIED)
        return view(request, *args, **kwargs)

    return wrapper


def _context(request: HttpRequest, **values: Any) -> dict[str, Any]:
    return {"can_write": can_write(request.user), **values}


# --- fleet ---------------------------------------------------------------------------------


def _fleet_filters(request: HttpRequest) -> tuple[QuerySet[Agent], dict[str, str], str]:
    """The filtered agents, the filters as given, and the first problem with them ("" if none)."""
    given = {
        key: request.GET.get(key, "").strip()
        for key in ("status", "health", "transport", "selector", "configuration", "version", "state", "drift", "q")
    }
    agents = fleet_selectors.agent_list()
    problem = ""
    if given["status"] in dict(fleet_selectors.AgentStatus.CHOICES):
        agents = agents.filter(fleet_selectors.status_q(given["status"]))
    if given["health"] in HEALTH:
        agents = agents.filter(HEALTH[given["health"]])
    if given["transport"] in Transport.values:
        agents = agents.filter(transport=given["transport"])
    if given["selector"]:
        try:
            agents = agents.filter(selector_q(parse_selector(given["selector"])))
        except SelectorError as error:
            problem = str(error)
    if given["configuration"]:
        agents = agents.filter(desired_config__configuration__name=given["configuration"])
    if given["version"].isdigit():
        agents = agents.filter(desired_config__version__number=int(given["version"]))
    if given["state"] in CONFIG_STATES:
        agents = agents.filter(remote_config_state=CONFIG_STATES[given["state"]])
    if given["drift"] == "yes":
        # Running something other than the desired version (the effective config says so).
        agents = agents.filter(pk__in=selectors.drifting_agents().values("pk"))
    if given["q"]:
        term = given["q"]
        # The names an operator knows an agent by; a whole instance uid finds that agent.
        match = Q()
        for key in SEARCHED_LABELS:
            match |= Q(**{f"labels__{key}__icontains": term})
        with contextlib.suppress(ValueError):
            match |= Q(instance_uid=uuid.UUID(term))
        agents = agents.filter(match)
    return agents, given, problem


@dataclass(frozen=True)
class Sort:
    """One sortable fleet column: the key it orders by, how a cursor spells that key, and the
    direction of the first click. The key never is NULL (Coalesce), so `(key, pk)` is a total
    order and the keyset range `(key, pk) > (value, pk)` visits every agent exactly once."""

    key: Callable[[], Any]
    kind: str  # "time" | "int" | "text": how the cursor's value is read back
    first_descending: bool = False


# Index-backed: first_seen, transport and config state ((column, id) indexes on fleet.Agent),
# last_seen (its own index; PostgreSQL sorts only the ties on id). Not index-backed, sorted
# by the database on each page: name (a JSON attribute), status (computed from presence),
# health (nullable, ordered unhealthy < unknown < healthy), configuration and desired
# version (a join). At 50,000 agents that is one sort of the filtered rows per page.
SERVICE_NAME = KeyTextTransform("service.name", "identifying_attributes")
SORTS: dict[str, Sort] = {
    "name": Sort(lambda: Coalesce(SERVICE_NAME, Value(""), output_field=TextField()), "text"),
    "status": Sort(lambda: F("status"), "text"),
    "health": Sort(
        lambda: Case(When(healthy=False, then=Value(0)), When(healthy=True, then=Value(2)), default=Value(1)), "int"
    ),
    "transport": Sort(lambda: F("transport"), "text"),
    "configuration": Sort(lambda: Coalesce(F("desired_config__configuration__name"), Value("")), "text"),
    "version": Sort(lambda: Coalesce(F("desired_config__version__number"), Value(0)), "int"),
    "state": Sort(lambda: F("remote_config_state"), "int"),
    "last_seen": Sort(lambda: F("last_seen"), "time", first_descending=True),
    "first_seen": Sort(lambda: F("first_seen"), "time", first_descending=True),
}
DEFAULT_SORT = "-last_seen"
COLUMN_LABELS = {
    "name": "agent",
    "status": "status",
    "health": "health",
    "transport": "transport",
    "configuration": "configuration",
    "version": "desired version",
    "state": "config state",
    "first_seen": "first seen",
    "last_seen": "last seen",
}


def _cursor_value(kind: str, text: str) -> Any:
    """The sort key a cursor carries, or None when the cursor is not one this page wrote."""
    if kind == "time":
        return parse_datetime(text)
    if kind == "int":
        return int(text) if text.lstrip("-").isdigit() else None
    return text


def _keyset(agents: QuerySet[Agent], *, sort: Sort, descending: bool, cursor: str) -> tuple[QuerySet[Agent], bool]:
    """Rows after `cursor` ("<key>|<pk>") in (key, pk) order: a range, never an OFFSET."""
    agents = agents.annotate(sort_key=sort.key())
    if cursor:
        value_text, _, pk_text = cursor.rpartition("|")
        value = _cursor_value(sort.kind, value_text)
        if value is None or not pk_text.isdigit():
            return agents.none(), True
        after = "lt" if descending else "gt"
        agents = agents.filter(Q(**{f"sort_key__{after}": value}) | Q(sort_key=value, **{f"pk__{after}": int(pk_text)}))
    order = ("-sort_key", "-pk") if descending else ("sort_key", "pk")
    return agents.order_by(*order), False


def _cursor_text(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


@page
def fleet_list(request: HttpRequest) -> HttpResponse:
    agents, given, problem = _fleet_filters(request)
    sort = request.GET.get("sort", DEFAULT_SORT)
    if sort.lstrip("-") not in SORTS:
        sort = DEFAULT_SORT
    descending = sort.startswith("-")
    counts = fleet_selectors.counts_by(agents, "status")
    cursor = request.GET.get("after", "")
    rows, stale = _keyset(agents, sort=SORTS[sort.lstrip("-")], descending=descending, cursor=cursor)
    window = list(rows.select_related("desired_config__configuration", "desired_config__version")[: PAGE_SIZE + 1])
    more = len(window) > PAGE_SIZE
    window = window[:PAGE_SIZE]
    next_query = ""
    if more:
        last = window[-1]
        query = request.GET.copy()
        query["after"] = f"{_cursor_text(last.sort_key)}|{last.pk}"
        next_query = query.urlencode()
    sort_links = {}
    for name, column in SORTS.items():
        query = request.GET.copy()
        query.pop("after", None)
        if sort.lstrip("-") == name:
            query["sort"] = name if descending else f"-{name}"
        else:
            query["sort"] = f"-{name}" if column.first_descending else name
        sort_links[name] = query.urlencode()
    arrow = "↓" if descending else "↑"
    columns = [
        {"label": label, "link": sort_links[name], "arrow": arrow if sort.lstrip("-") == name else ""}
        for name, label in COLUMN_LABELS.items()
    ]
    first_page = request.GET.copy()
    first_page.pop("after", None)
    return render(
        request,
        "dashboard/fleet.html",
        _context(
            request,
            agents=window,
            given=given,
            problem=problem or (BAD_CURSOR if stale else ""),
            total=sum(counts.values()),
            counts=[(status, counts.get(status, 0)) for status, _ in fleet_selectors.AgentStatus.CHOICES],
            sort=sort,
            sort_links=sort_links,
            columns=columns,
            next_query=next_query,
            first_query=first_page.urlencode() if "after" in request.GET else "",
            statuses=[s for s, _ in fleet_selectors.AgentStatus.CHOICES],
            healths=list(HEALTH),
            transports=Transport.values,
            states=list(CONFIG_STATES),
            configurations=list(Configuration.objects.order_by("name").values_list("name", flat=True)),
        ),
    )


# --- agent ---------------------------------------------------------------------------------


def _health_tree(health: Any, name: str = "agent") -> dict[str, Any]:
    """The reported ComponentHealth document as nested nodes for the tree template."""
    if not isinstance(health, dict):
        return {"name": name, "healthy": None, "status": "", "error": "", "children": []}
    children = health.get("components") or {}
    return {
        "name": name,
        "healthy": health.get("healthy"),
        "status": health.get("status", ""),
        "error": health.get("last_error", ""),
        "children": [_health_tree(child, key) for key, child in sorted(children.items()) if isinstance(child, dict)],
    }


def _files_of(document: Any) -> dict[str, str]:
    """{file name: body} from a stored version's files or an effective config document."""
    if not isinstance(document, dict):
        return {}
    files = document.get("config_map", document)
    if not isinstance(files, dict):
        return {}
    out = {}
    for name, value in files.items():
        body = value.get("body", "") if isinstance(value, dict) else value
        out[str(name)] = body if isinstance(body, str) else str(body)
    return out


def side_by_side(before: dict[str, str], after: dict[str, str]) -> list[dict[str, Any]]:
    """Per file, aligned rows (left, right, kind) for a two-column diff."""
    result = []
    for name in sorted(set(before) | set(after)):
        left, right = before.get(name, "").splitlines(), after.get(name, "").splitlines()
        rows: list[tuple[str, str, str]] = []
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=left, b=right, autojunk=False).get_opcodes():
            if tag == "equal":
                rows += [(line, line, "same") for line in left[i1:i2]]
                continue
            olds, news = left[i1:i2], right[j1:j2]
            for index in range(max(len(olds), len(news))):
                rows.append(
                    (
                        olds[index] if index < len(olds) else "",
                        news[index] if index < len(news) else "",
                        "changed"
                        if index < len(olds) and index < len(news)
                        else ("removed" if index < len(olds) else "added"),
                    )
                )
        result.append({"name": name, "rows": rows, "changed": any(kind != "same" for _, _, kind in rows)})
    return result


@page
def agent_detail(request: HttpRequest, instance_uid: uuid.UUID) -> HttpResponse:
    agent = get_object_or_404(fleet_selectors.agent_list(), instance_uid=instance_uid)
    errors: list[str] = []
    if request.method == "POST":
        action = request.POST.get("action")
        try:
            if action == "labels":
                labels = {}
                for line in request.POST.get("labels", "").splitlines():
                    if line.strip():
                        key, sep, value = line.partition("=")
                        if not sep:
                            raise DomainError(f"{line.strip()!r}: write each label as key=value")
                        labels[key.strip()] = value.strip()
                agent_labels.agent_labels_set(instance_uid=agent.instance_uid, labels=labels, actor=request.user)
            elif action == "resend":
                resend.agent_config_resend(agent=agent, actor=request.user)
            elif action == "revoke":
                certificate = get_object_or_404(
                    IssuedCertificate, pk=_number(request.POST.get("certificate"), 0), instance_uid=agent.instance_uid
                )
                signing_services.certificate_revoke(certificate=certificate, actor=request.user)
            if not errors:
                return redirect("dashboard-agent", instance_uid=agent.instance_uid)
        except DomainError as error:
            errors.append(error.message)
    state = selectors.agent_config_state(agent)
    desired = getattr(agent, "desired_config", None) if hasattr(agent, "desired_config") else None
    desired_files = _files_of(desired.version.files) if desired is not None else {}
    effective_files = _files_of(agent.effective_config)
    certificates = IssuedCertificate.objects.filter(instance_uid=agent.instance_uid).order_by("-not_before")
    return render(
        request,
        "dashboard/agent.html",
        _context(
            request,
            agent=agent,
            errors=errors,
            state=state,
            desired=desired,
            health=_health_tree(agent.health),
            diff=side_by_side(effective_files, desired_files),
            operator_labels="\n".join(f"{k}={v}" for k, v in sorted(agent.operator_labels.items())),
            certificates=certificates,
            # Changes made to the agent, and to its certificates (those name its uid).
            audit=fleet_selectors.audit_list().filter(
                Q(target_type=Agent.__name__, target_id=str(agent.pk))
                | Q(details__instance_uid=str(agent.instance_uid))
            )[:20],
        ),
    )


# --- configurations ------------------------------------------------------------------------


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
        _context(
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
                    to_number=_number(request.POST.get("version"), 0) or 0,
                    author=request.user,
                )
            return redirect("dashboard-configuration", name=configuration.name)
        except DomainError as error:
            errors.append(error.message)
        except ConfigValidationError as error:
            errors.extend(error.problems)  # every problem, shown beside the form
    versions = list(selectors.version_list(configuration))
    numbers = [v.number for v in versions]
    older = _number(request.GET.get("from"), numbers[1] if len(numbers) > 1 else None)
    newer = _number(request.GET.get("to"), numbers[0] if numbers else None)
    by_number = {v.number: v for v in versions}
    diff = []
    if older in by_number and newer in by_number:
        diff = side_by_side(_files_of(by_number[older].files), _files_of(by_number[newer].files))
    current = configuration.current_version
    return render(
        request,
        "dashboard/configuration.html",
        _context(
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
            else _files_of(current.files).get("collector.yaml", "")
            if current
            else "",
            rollouts=configuration.rollouts.select_related("candidate_version", "stable_version")[:20],
        ),
    )


def _number(text: str | None, default: int | None) -> int | None:
    return int(text) if text and text.isdigit() else default


# --- rollouts ------------------------------------------------------------------------------


@page
def rollout_list(request: HttpRequest) -> HttpResponse:
    rollouts = Rollout.objects.select_related("configuration", "stable_version", "candidate_version")[:100]
    return render(request, "dashboard/rollouts.html", _context(request, rollouts=rollouts))


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
                candidate = configuration.versions.filter(number=_number(post.get("candidate"), 0) or 0).first()
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
        _context(
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
                    rollout=rollout, stage_index=_number(request.POST.get("stage"), -1) or 0, actor=request.user
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
    context = _context(
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


# --- certificate requests ------------------------------------------------------------------


@page
def certificate_requests(request: HttpRequest) -> HttpResponse:
    errors: list[str] = []
    if request.method == "POST":
        pending = get_object_or_404(CertificateRequest, pk=_number(request.POST.get("request"), 0))
        try:
            if request.POST.get("decision") == "approve":
                signing_services.certificate_request_approve(request=pending, actor=request.user)
            else:
                signing_services.certificate_request_reject(
                    request=pending, actor=request.user, reason=request.POST.get("reason", "")
                )
            return redirect("dashboard-certificate-requests")
        except DomainError as error:
            errors.append(error.message)
    return render(
        request,
        "dashboard/certificate_requests.html",
        _context(
            request,
            pending=signing_selectors.pending_certificate_requests()[:200],
            decided=signing_selectors.certificate_request_list().exclude(state=CertificateRequest.State.PENDING)[:50],
            errors=errors,
        ),
    )
