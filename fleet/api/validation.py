"""Request validation every API of the project shares: strict serializers, the labels
field, and one call that validates a body or raises the 400."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.serializers import Serializer


def validated(serializer_class: type[Serializer], data: Any, *, partial: bool = False) -> dict[str, Any]:
    """The request data as `serializer_class` validates it; a ValidationError (400) otherwise."""
    serializer = serializer_class(data=data, partial=partial)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class StrictSerializer(serializers.Serializer):
    """Unknown keys are an error: a misspelt `requires_approval` must not silently vanish."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({key: ["unknown field"] for key in unknown})
        return super().to_internal_value(data)


class LabelsField(serializers.DictField):
    """Label keys to string values; the service checks keys and values."""

    child = serializers.JSONField()
