from __future__ import annotations

from dataclasses import dataclass

import pytest

from opamp.hashing import config_map_hash
from opamp.identifiers import instance_uid_problem, uuid7


def test_uuid7_has_version_7_and_the_rfc_variant():
    value = uuid7()
    assert value.version == 7
    assert value.variant == "specified in RFC 4122"


def test_uuid7_orders_by_time():
    assert uuid7(unix_ms=1_000).bytes < uuid7(unix_ms=2_000).bytes


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "must be 16 bytes, got 0"),
        (b"\x01" * 15, "must be 16 bytes, got 15"),
        (b"\x01" * 17, "must be 16 bytes, got 17"),
        (b"\x00" * 16, "must not be all zero"),
    ],
)
def test_bad_instance_uids_are_named(raw: bytes, problem: str):
    assert problem in (instance_uid_problem(raw) or "")


def test_a_uuid7_is_an_acceptable_instance_uid():
    assert instance_uid_problem(uuid7().bytes) is None


@dataclass
class File:
    body: bytes
    content_type: str


def test_the_config_hash_ignores_map_order():
    a = {"a.yaml": File(b"x: 1", "text/yaml"), "b.yaml": File(b"y: 2", "text/yaml")}
    b = {"b.yaml": File(b"y: 2", "text/yaml"), "a.yaml": File(b"x: 1", "text/yaml")}
    assert config_map_hash(a) == config_map_hash(b)
    assert len(config_map_hash(a)) == 32


def test_the_config_hash_separates_name_and_body_boundaries():
    assert config_map_hash({"ab": File(b"c", "")}) != config_map_hash({"a": File(b"bc", "")})


def test_the_config_hash_covers_the_content_type():
    assert config_map_hash({"a": File(b"x", "text/yaml")}) != config_map_hash({"a": File(b"x", "application/json")})
