"""Who a message speaks for: the connection's credential against the instance_uid, the
enrollment it counts, and the duplicate-uid rules (in-process and across processes).

All of it is decided before anything of the message, or of another session, changes.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from fleet import selectors
from fleet.credentials import CredentialKind, CredentialRefused
from fleet.db import db
from fleet.protocol_errors import ProtocolError
from fleet.services import AgentSnapshot
from opamp.capabilities import AgentToServerFlags
from opamp.identifiers import uuid7
from opamp.proto import opamp_pb2

if TYPE_CHECKING:
    from fleet.session import AgentSession

logger = logging.getLogger(__name__)

CERTIFIED_SESSION_LIVE = (
    "agent {uid} is connected with its client certificate; only that certificate may replace its session"
)


async def check_identity(session: AgentSession, instance_uid: uuid.UUID) -> None:
    """May this connection's credential speak for `instance_uid`? Once per connection and uid
    (the caller skips it for the uid already checked)."""
    problem = session.credential.identity_problem(instance_uid)
    if problem is None and session.credential.kind is CredentialKind.TOKEN:
        try:
            await db(session.fleet.credentials.identity_check)(session.credential, instance_uid)
        except CredentialRefused as error:
            problem = error.message
    if problem:
        logger.warning("refused a message from %s: %s", session.remote_address, problem)
        raise ProtocolError(problem)
    session.identity_checked = instance_uid


def enrollment_due(session: AgentSession, instance_uid: uuid.UUID) -> bool:
    """Whether the agent is still to be counted against the connection's enrollment token
    (once per process and agent)."""
    credential = session.credential
    if credential.kind is not CredentialKind.TOKEN or credential.token_id is None:
        return False
    return (credential.token_id, instance_uid) not in session.fleet.enrolled


async def enroll(session: AgentSession, instance_uid: uuid.UUID) -> dict[str, str]:
    """Count the agent against its enrollment token (when `enrollment_due`).

    Returns labels still to apply (the token's, for an agent not yet inventoried).
    """
    credential = session.credential
    assert credential.token_id is not None
    try:
        labels = await db(session.fleet.credentials.enrollment_record)(credential, instance_uid)
    except CredentialRefused as error:
        raise ProtocolError(error.message) from None
    session.fleet.enrolled.add((credential.token_id, instance_uid))
    return labels


async def new_instance_uid_if_needed(
    session: AgentSession,
    message: opamp_pb2.AgentToServer,
    instance_uid: uuid.UUID,
    snapshot: AgentSnapshot | None,
    identifying: dict[str, object] | None,
) -> uuid.UUID | None:
    bound = session.credential.bound_uid is not None
    if message.flags & AgentToServerFlags.REQUEST_INSTANCE_UID and not bound:
        return uuid7()
    if session.transport != "websocket":
        return None
    session.identity_differs = (
        not bound
        and identifying is not None
        and snapshot is not None
        and snapshot.identifying_attributes != identifying
    )
    other = session.fleet.live.by_uid.get(instance_uid)
    if other is None and session.identity_differs:
        # No session of the uid here: the row tells whether one is live on another
        # process. Decided before anything of this message is written, as in-process.
        if await db(selectors.agent_live_on_websocket)(instance_uid=instance_uid):
            logger.warning(
                "duplicate instance_uid %s from %s (live on another server process): assigning a new one",
                instance_uid,
                session.remote_address,
            )
            return uuid7()
        return None
    if other is None or other is session or other.closed:
        return None
    if bound:
        # The certificate proves who this is: the older socket is the stale one.
        other.superseded()
        return None
    # Two live sockets with one uid: the same agent reconnecting leaves the old socket
    # to be dropped; a different agent (other identifying attributes) gets a new uid.
    if session.identity_differs:
        logger.warning("duplicate instance_uid %s from %s: assigning a new one", instance_uid, session.remote_address)
        return uuid7()
    if other.credential.is_certificate:
        # Only the certificate may replace a session the certificate proved: a holder
        # of the token that requested it (shared by many agents) may not.
        problem = CERTIFIED_SESSION_LIVE.format(uid=instance_uid)
        logger.warning("refused a message from %s: %s", session.remote_address, problem)
        raise ProtocolError(problem)
    other.superseded()
    return None
