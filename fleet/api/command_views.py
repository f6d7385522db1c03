"""Commands (restart) and custom messages: operators ask, viewers read what became of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import django_filters
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import generics, mixins, status, viewsets
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer

from fleet import selectors
from fleet.api import command_serializers as s
from fleet.api.permissions import RolePermission
from fleet.api.validation import validated
from fleet.commands import RestartOutcome, command_delivery, command_list, restart_request
from fleet.custom_messages import (
    SendOutcome,
    custom_message_delivery,
    custom_message_send,
    custom_messages_of,
    queued_custom_messages,
)
from fleet.label_selectors.parsing import parse_selector
from fleet.models import Agent, AgentCommand, AgentCustomMessage, QueuedCustomMessage
from fleet.pending_deliveries import DELIVERY_STATE_CHOICES, Delivery, DeliveryState
from fleet.selector_queries import agents_matching


def _agent(instance_uid: Any) -> Agent:
    return get_object_or_404(selectors.agent_list(), instance_uid=instance_uid)


def _selected(selector: Any) -> tuple[QuerySet[Agent], str]:
    parsed = parse_selector(selector)
    return agents_matching(parsed), parsed.to_string()


def _outcome_answer(
    *,
    done: tuple[str, str, list[Any]],
    skipped: Sequence[tuple[str, str, list[Any]]],
    items_key: str,
    serializer_class: type[Serializer],
) -> Response:
    """An action on one agent or a selector: how many were done and why the others were
    skipped, counts and one readable line; 202 when anything was done, else 200.
    `done` and each `skipped` entry: (count key, the line's wording, the agents)."""
    key, wording, items = done
    body: dict[str, Any] = {key: len(items), items_key: items}
    parts = [f"{len(items)} {wording}"]
    for skip_key, reason, agents in skipped:
        body[skip_key] = len(agents)
        if agents:
            parts.append(f"{len(agents)} agent(s) skipped: {reason}")
    body["detail"] = "; ".join(parts)
    code = status.HTTP_202_ACCEPTED if items else status.HTTP_200_OK
    return Response(serializer_class(body).data, status=code)


def _restart_answer(outcome: RestartOutcome) -> Response:
    return _outcome_answer(
        done=("requested", "restart(s) requested", outcome.requested),
        skipped=[
            ("not_capable", "they do not accept restart commands", outcome.not_capable),
            (
                "rate_limited",
                "a restart is pending or was requested within OPAMP_RESTART_MIN_INTERVAL_SECONDS",
                outcome.rate_limited,
            ),
        ],
        items_key="commands",
        serializer_class=s.RestartOutcomeSerializer,
    )


def _send_answer(outcome: SendOutcome) -> Response:
    return _outcome_answer(
        done=("queued", "message(s) queued", outcome.queued),
        skipped=[
            ("not_capable", "they did not declare the capability", outcome.not_capable),
            ("queue_full", "their queue is full", outcome.queue_full),
        ],
        items_key="messages",
        serializer_class=s.SendOutcomeSerializer,
    )


class AgentRestartView(generics.GenericAPIView):
    """Ask one agent to restart (operators)."""

    permission_classes = [RolePermission]
    serializer_class = s.RestartInputSerializer

    @extend_schema(request=s.RestartInputSerializer, responses=s.RestartOutcomeSerializer)
    def post(self, request: Request, instance_uid: Any) -> Response:
        validated(s.RestartInputSerializer, request.data)
        agent = _agent(instance_uid)
        return _restart_answer(restart_request(agents=Agent.objects.filter(pk=agent.pk), actor=request.user))


class SelectorRestartView(generics.GenericAPIView):
    """Ask every agent a label selector picks to restart (operators)."""

    permission_classes = [RolePermission]
    serializer_class = s.SelectorRestartInputSerializer

    @extend_schema(request=s.SelectorRestartInputSerializer, responses=s.RestartOutcomeSerializer)
    def post(self, request: Request) -> Response:
        data = validated(s.SelectorRestartInputSerializer, request.data)
        agents, selector = _selected(data["selector"])
        return _restart_answer(restart_request(agents=agents, actor=request.user, selector=selector))


class DeliveryFilters(django_filters.FilterSet):
    """`pending` and `state` by the delivery rule of the rows' kind (expiry is derived from
    the request time, so these are conditions, not a column)."""

    pending = django_filters.BooleanFilter(
        method="filter_pending", help_text="true: waiting for the agent (not delivered, not expired)"
    )
    state = django_filters.ChoiceFilter(method="filter_state", choices=DELIVERY_STATE_CHOICES, help_text=s.STATE_HELP)

    def delivery(self) -> Delivery:
        raise NotImplementedError

    def filter_pending(self, queryset: QuerySet[Any], name: str, value: bool) -> QuerySet[Any]:
        waiting = self.delivery().waiting_q()
        return queryset.filter(waiting) if value else queryset.exclude(waiting)

    def filter_state(self, queryset: QuerySet[Any], name: str, value: str) -> QuerySet[Any]:
        return queryset.filter(self.delivery().state_q(DeliveryState(value)))


class CommandFilter(DeliveryFilters):
    agent = django_filters.UUIDFilter(field_name="agent__instance_uid", help_text="the agent's instance_uid")

    def delivery(self) -> Delivery:
        return command_delivery()

    class Meta:
        model = AgentCommand
        fields = ["agent", "pending", "state", "kind"]


class CommandViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Commands asked of agents, newest first, with their delivery and whether the agent came back."""

    permission_classes = [RolePermission]
    serializer_class = s.CommandSerializer
    filterset_class = CommandFilter
    ordering_fields = ["requested_at"]
    ordering = ["-requested_at", "-id"]

    def get_queryset(self) -> QuerySet[AgentCommand]:
        return command_list()


class AgentCustomMessagesView(generics.ListAPIView):
    """GET: the custom messages the agent sent, newest first (the newest
    OPAMP_CUSTOM_MESSAGE_HISTORY are kept). POST: send it one (operators)."""

    permission_classes = [RolePermission]
    serializer_class = s.AgentCustomMessageSerializer
    ordering_fields = ["id"]
    ordering = ["-id"]

    def get_queryset(self) -> QuerySet[Any]:
        if getattr(self, "swagger_fake_view", False):  # the schema is drawn without an agent
            return AgentCustomMessage.objects.none()
        return custom_messages_of(_agent(self.kwargs["instance_uid"]))

    @extend_schema(request=s.CustomMessageInputSerializer, responses=s.SendOutcomeSerializer)
    def post(self, request: Request, instance_uid: Any) -> Response:
        data = validated(s.CustomMessageInputSerializer, request.data)
        agent = _agent(instance_uid)
        outcome = custom_message_send(agents=Agent.objects.filter(pk=agent.pk), actor=request.user, **data)
        return _send_answer(outcome)


class QueuedCustomMessageFilter(DeliveryFilters):
    agent = django_filters.UUIDFilter(field_name="agent__instance_uid", help_text="the agent's instance_uid")

    def delivery(self) -> Delivery:
        return custom_message_delivery()

    class Meta:
        model = QueuedCustomMessage
        fields = ["agent", "pending", "state", "capability"]


class CustomMessagesView(generics.ListAPIView):
    """GET: custom messages sent to agents, newest first, with their delivery. POST: send one
    to every agent a label selector picks that declared its capability (operators)."""

    permission_classes = [RolePermission]
    serializer_class = s.QueuedCustomMessageSerializer
    filterset_class = QueuedCustomMessageFilter
    ordering_fields = ["id"]
    ordering = ["-id"]

    def get_queryset(self) -> QuerySet[QueuedCustomMessage]:
        return queued_custom_messages()

    @extend_schema(request=s.SelectorCustomMessageInputSerializer, responses=s.SendOutcomeSerializer)
    def post(self, request: Request) -> Response:
        data = validated(s.SelectorCustomMessageInputSerializer, request.data)
        agents, selector = _selected(data.pop("selector"))
        return _send_answer(custom_message_send(agents=agents, actor=request.user, selector=selector, **data))
