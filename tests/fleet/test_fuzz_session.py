"""Property-based fuzzing of the OpAMP session through both transports.

AgentToServer messages with random combinations of every field (strings with NUL and
other odd characters, huge numbers, nested health and attribute trees, random capability
and flag bits, random CSR bytes) and random byte mutations of valid frames go through the
real ASGI application, over the WebSocket consumer and the HTTP app. Properties: the
application never raises, every reply decodes as a ServerToAgent that echoes the
instance_uid or carries only an error_response, the batched writes flush without an error,
and afterwards the process still serves a normal agent.

Example counts are modest so that CI stays fast; OPAMP_FUZZ_EXAMPLES raises them (a
longer run on demand: `OPAMP_FUZZ_EXAMPLES=2000 pytest tests/fleet/test_fuzz_session.py`).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.session_runtime import runtime
from opamp.codec import (
    FrameError,
    decode_agent_to_server,
    decode_agent_ws_frame,
    decode_server_ws_frame,
    encode_ws_frame,
)
from opamp.identifiers import uuid7
from opamp.proto import anyvalue_pb2, opamp_pb2
from rollouts.session_contributor import RemoteConfigContributor
from tests.fleet.asgi_clients import WsAgent, decode_http_reply, http_post
from tests.fleet.messages import full_report, heartbeat

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

EXAMPLES = int(os.environ.get("OPAMP_FUZZ_EXAMPLES", "40"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
# protobuf strings are UTF-8: no surrogates can travel; NUL, U+FFFD and the rest can.
CHARACTERS = st.characters(exclude_categories=("Cs",))
TEXT = st.one_of(
    st.text(CHARACTERS, max_size=20),
    st.sampled_from(["", "\x00", "a\x00b", "\ufffd", "\U0010ffff", "\u202e", "x" * 5000]),
)
SHORT_BYTES = st.binary(max_size=40)


def any_values() -> st.SearchStrategy[anyvalue_pb2.AnyValue]:
    leaves = st.one_of(
        TEXT.map(lambda text: anyvalue_pb2.AnyValue(string_value=text)),
        st.booleans().map(lambda flag: anyvalue_pb2.AnyValue(bool_value=flag)),
        INT64.map(lambda number: anyvalue_pb2.AnyValue(int_value=number)),
        st.floats().map(lambda number: anyvalue_pb2.AnyValue(double_value=number)),
        SHORT_BYTES.map(lambda data: anyvalue_pb2.AnyValue(bytes_value=data)),
    )

    def arrays(children: st.SearchStrategy[anyvalue_pb2.AnyValue]) -> st.SearchStrategy[anyvalue_pb2.AnyValue]:
        return st.lists(children, max_size=3).map(
            lambda items: anyvalue_pb2.AnyValue(array_value=anyvalue_pb2.ArrayValue(values=items))
        )

    def kvlists(children: st.SearchStrategy[anyvalue_pb2.AnyValue]) -> st.SearchStrategy[anyvalue_pb2.AnyValue]:
        return st.lists(st.tuples(TEXT, children), max_size=3).map(
            lambda pairs: anyvalue_pb2.AnyValue(
                kvlist_value=anyvalue_pb2.KeyValueList(
                    values=[anyvalue_pb2.KeyValue(key=key, value=value) for key, value in pairs]
                )
            )
        )

    return st.recursive(leaves, lambda children: st.one_of(arrays(children), kvlists(children)), max_leaves=12)


KEY_VALUES = st.lists(st.tuples(TEXT, any_values()), max_size=4).map(
    lambda pairs: [anyvalue_pb2.KeyValue(key=key, value=value) for key, value in pairs]
)


def component_health() -> st.SearchStrategy[opamp_pb2.ComponentHealth]:
    def build(healthy: bool, times: tuple[int, int], texts: tuple[str, str], attributes: Any) -> Any:
        return opamp_pb2.ComponentHealth(
            healthy=healthy,
            start_time_unix_nano=times[0],
            status_time_unix_nano=times[1],
            status=texts[0],
            last_error=texts[1],
            attributes=attributes,
        )

    leaf = st.builds(build, st.booleans(), st.tuples(UINT64, UINT64), st.tuples(TEXT, TEXT), KEY_VALUES)

    def nested(children: st.SearchStrategy[opamp_pb2.ComponentHealth]) -> Any:
        def attach(parent: opamp_pb2.ComponentHealth, named: dict[str, Any]) -> opamp_pb2.ComponentHealth:
            for name, child in named.items():
                parent.component_health_map[name].CopyFrom(child)
            return parent

        return st.builds(attach, leaf, st.dictionaries(TEXT, children, max_size=3))

    return st.recursive(leaf, nested, max_leaves=8)


def set_description(message: opamp_pb2.AgentToServer, parts: tuple[Any, Any]) -> None:
    message.agent_description.identifying_attributes.extend(parts[0])
    message.agent_description.non_identifying_attributes.extend(parts[1])


def set_effective_config(message: opamp_pb2.AgentToServer, files: dict[str, tuple[bytes, str]]) -> None:
    message.effective_config.config_map.SetInParent()
    for name, (body, content_type) in files.items():
        file = message.effective_config.config_map.config_map[name]
        file.body, file.content_type = body, content_type


def set_remote_config_status(message: opamp_pb2.AgentToServer, parts: tuple[bytes, int, str]) -> None:
    status = message.remote_config_status
    status.last_remote_config_hash, status.status, status.error_message = parts


def set_package_statuses(message: opamp_pb2.AgentToServer, parts: tuple[dict[str, Any], bytes, str]) -> None:
    packages, statuses = parts[0], message.package_statuses
    statuses.SetInParent()
    for name, (version, digest, state, error) in packages.items():
        package = statuses.packages[name]
        package.agent_has_version, package.agent_has_hash, package.status, package.error_message = (
            version,
            digest,
            state,
            error,
        )
    statuses.server_provided_all_packages_hash, statuses.error_message = parts[1], parts[2]


def set_available_components(message: opamp_pb2.AgentToServer, parts: tuple[bytes, dict[str, Any]]) -> None:
    components = message.available_components
    components.hash = parts[0]
    components.SetInParent()
    for name, metadata in parts[1].items():
        components.components[name].metadata.extend(metadata)


def set_custom_capabilities(message: opamp_pb2.AgentToServer, names: list[str]) -> None:
    message.custom_capabilities.capabilities.extend(names)


def set_connection_settings_status(message: opamp_pb2.AgentToServer, parts: tuple[bytes, int, str]) -> None:
    status = message.connection_settings_status
    status.last_connection_settings_hash, status.status, status.error_message = parts


def set_csr(message: opamp_pb2.AgentToServer, csr: bytes) -> None:
    message.connection_settings_request.opamp.certificate_request.csr = csr


def set_custom_message(message: opamp_pb2.AgentToServer, parts: tuple[str, str, bytes]) -> None:
    message.custom_message.capability, message.custom_message.type, message.custom_message.data = parts


def set_disconnect(message: opamp_pb2.AgentToServer, _: bool) -> None:
    message.agent_disconnect.SetInParent()


ENUM_INT = st.integers(min_value=-5, max_value=2**31 - 1)
PARTS = {
    "description": (st.tuples(KEY_VALUES, KEY_VALUES), set_description),
    "health": (component_health(), lambda message, health: message.health.CopyFrom(health)),
    "effective_config": (
        st.dictionaries(TEXT, st.tuples(st.binary(max_size=200), TEXT), max_size=3),
        set_effective_config,
    ),
    "remote_config_status": (st.tuples(SHORT_BYTES, ENUM_INT, TEXT), set_remote_config_status),
    "package_statuses": (
        st.tuples(st.dictionaries(TEXT, st.tuples(TEXT, SHORT_BYTES, ENUM_INT, TEXT), max_size=3), SHORT_BYTES, TEXT),
        set_package_statuses,
    ),
    "available_components": (
        st.tuples(SHORT_BYTES, st.dictionaries(TEXT, KEY_VALUES, max_size=3)),
        set_available_components,
    ),
    "custom_capabilities": (st.lists(TEXT, max_size=4), set_custom_capabilities),
    "connection_settings_status": (st.tuples(SHORT_BYTES, ENUM_INT, TEXT), set_connection_settings_status),
    "csr": (st.binary(max_size=300), set_csr),
    "custom_message": (st.tuples(TEXT, TEXT, SHORT_BYTES), set_custom_message),
    "disconnect": (st.just(True), set_disconnect),
}
INSTANCE_UIDS = st.one_of(
    st.builds(lambda: uuid7().bytes),
    st.binary(min_size=16, max_size=16),
    st.binary(max_size=20),
)


@st.composite
def agent_messages(draw: st.DrawFn) -> opamp_pb2.AgentToServer:
    message = opamp_pb2.AgentToServer(
        instance_uid=draw(INSTANCE_UIDS),
        sequence_num=draw(UINT64),
        capabilities=draw(UINT64),
        flags=draw(UINT64),
    )
    chosen = draw(st.lists(st.sampled_from(sorted(PARTS)), unique=True, max_size=len(PARTS)))
    for name in chosen:
        strategy, apply = PARTS[name]
        apply(message, draw(strategy))
    return message


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    """A valid serialized message with bytes flipped, cut, inserted or duplicated."""
    data = bytearray(draw(agent_messages()).SerializeToString())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "duplicate"]))
        position = draw(st.integers(min_value=0, max_value=len(data)))
        if kind == "flip" and data:
            index = min(position, len(data) - 1)
            data[index] ^= draw(st.integers(min_value=1, max_value=255))
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += data[position:]
    return bytes(data)


def assert_well_formed(reply: opamp_pb2.ServerToAgent, sent: opamp_pb2.AgentToServer | None) -> None:
    if reply.HasField("error_response"):
        # An error reply carries nothing else (the instance_uid of the message, if any).
        assert [field.name for field, _ in reply.ListFields()] in (
            ["error_response"],
            ["instance_uid", "error_response"],
        ), reply
        assert reply.error_response.error_message
        return
    assert sent is not None, "an undecodable frame must get an error reply"
    # The uid the message carried; the server's assignment, when it makes one, is separate.
    assert reply.instance_uid == sent.instance_uid
    assert reply.capabilities


async def flush_buffers() -> None:
    """The batched writes of what was reported: a failure here is a failure of the fuzz run."""
    fleet = runtime()
    for buffer in (fleet.statuses, fleet.heartbeats, fleet.contributor(RemoteConfigContributor).offers):
        await buffer.flush()
        assert buffer.pending_count == 0, buffer.name


async def over_websocket(frame: bytes) -> opamp_pb2.ServerToAgent | None:
    """The reply to `frame` on a fresh socket; None when the consumer closed it instead."""
    async with WsAgent() as agent:
        # Straight to the application: the communicator's own sender refuses an empty frame.
        await agent.communicator.send_input({"type": "websocket.receive", "bytes": frame})
        output = await agent.communicator.receive_output(5)
        if output["type"] == "websocket.close":
            return None
        assert output["type"] == "websocket.send" and output.get("bytes") is not None, output
        return decode_server_ws_frame(output["bytes"])


async def over_http(body: bytes) -> opamp_pb2.ServerToAgent:
    response = await http_post(body)
    assert response["status"] in (200, 400), response
    assert response["headers_dict"][b"content-type"] == b"application/x-protobuf"
    reply = decode_http_reply(response)
    assert (response["status"] == 400) == reply.HasField("error_response")
    return reply


def decodes(data: bytes) -> opamp_pb2.AgentToServer | None:
    try:
        return decode_agent_to_server(data)
    except FrameError:
        return None


async def assert_a_normal_agent_is_served() -> None:
    uid = uuid7().bytes
    async with WsAgent() as agent:
        first = await agent.exchange(full_report(uid, 1))
        second = await agent.exchange(heartbeat(uid, 2))
    for reply in (first, second):
        assert reply.instance_uid == uid and not reply.HasField("error_response")
    over = await over_http(full_report(uuid7().bytes, 1).SerializeToString())
    assert not over.HasField("error_response")
    await flush_buffers()


@FUZZ_SETTINGS
@given(message=agent_messages())
async def test_random_messages_over_websocket_get_well_formed_replies(message):
    reply = await over_websocket(encode_ws_frame(message))
    assert reply is not None
    assert_well_formed(reply, message)
    await assert_a_normal_agent_is_served()


@FUZZ_SETTINGS
@given(message=agent_messages())
async def test_random_messages_over_http_get_well_formed_replies(message):
    assert_well_formed(await over_http(message.SerializeToString()), message)
    await assert_a_normal_agent_is_served()


@FUZZ_SETTINGS
@given(data=mutated_frames(), header=st.booleans())
async def test_mutated_frames_over_websocket_get_well_formed_replies(data, header):
    frame = b"\x00" + data if header else data
    reply = await over_websocket(frame)
    assert reply is not None
    try:
        decoded: opamp_pb2.AgentToServer | None = decode_agent_ws_frame(frame)
    except FrameError:
        decoded = None
    assert_well_formed(reply, decoded)
    await assert_a_normal_agent_is_served()


@FUZZ_SETTINGS
@given(data=mutated_frames())
async def test_mutated_bodies_over_http_get_well_formed_replies(data):
    assert_well_formed(await over_http(data), decodes(data))
    await assert_a_normal_agent_is_served()
