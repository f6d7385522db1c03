from __future__ import annotations

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from fleet.models import Agent
from opamp.identifiers import uuid7


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("correct horse battery")


class AgentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Agent

    instance_uid = factory.LazyFunction(uuid7)
    identifying_attributes = factory.Sequence(lambda n: {"service.name": f"svc-{n}"})
    non_identifying_attributes = factory.LazyFunction(lambda: {"os.type": "linux"})
    capabilities = 0x2003
    description_received = True
    connected = True
    healthy = True
    transport = "websocket"
    last_seen = factory.LazyFunction(timezone.now)
    connected_at = factory.LazyFunction(timezone.now)
