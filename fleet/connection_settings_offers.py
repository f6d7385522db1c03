"""One ConnectionSettingsOffers per reply, filled by several contributors, hashed once.

Signing offers a certificate (`opamp`), the fleet offers telemetry destinations and a
heartbeat interval (fleet.connection_settings_contributor); both fill the same
`ServerToAgent.connection_settings` at `ReplyPart.CONNECTION_SETTINGS`, and the fleet's
`ReplyPart.CONNECTION_SETTINGS_HASH` step then sets the hash over the whole message, as
the protocol wants ("hash of all settings"). The agent answers with that hash, so a
contributor cannot recognise its own part in it by its own digest alone: each contributor
names the digest of the part it added (`adding`), the sealing step records which parts each
sent hash held (`sealed`), and a contributor asks `covers` whether a hash an agent reported
held its part. The ledger is per server process (FleetRuntime) and keeps the last few
offers per agent, also after it disconnects (its next connection opens with the hash it
holds); after a restart it is empty, which costs at most one repeated offer.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.session import AgentSession

# Sent offers remembered per agent: the newest few are all an answer can refer to.
KEEP_PER_AGENT = 4


class _PartsKey:
    """The session memo key of the parts added to the reply being composed."""


PARTS = _PartsKey()


class SettingsOfferLedger:
    def __init__(self) -> None:
        self._sent: dict[uuid.UUID, OrderedDict[bytes, frozenset[bytes]]] = {}

    def adding(self, session: AgentSession, digest: bytes) -> None:
        """A contributor added a part (its own digest) to the reply being composed."""
        parts: list[bytes] | None = session.remembered(PARTS)
        if parts is None:
            session.remember(PARTS, [digest])
        else:
            parts.append(digest)

    def sealed(self, session: AgentSession, instance_uid: uuid.UUID, offer_hash: bytes) -> None:
        """The reply's offers were hashed: remember which parts that hash held."""
        parts: list[bytes] | None = session.remembered(PARTS)
        session.remember(PARTS, None)
        sent = self._sent.setdefault(instance_uid, OrderedDict())
        sent[offer_hash] = frozenset(parts or ())
        sent.move_to_end(offer_hash)
        while len(sent) > KEEP_PER_AGENT:
            sent.popitem(last=False)

    def discard_parts(self, session: AgentSession) -> None:
        """A reply composed without offers: nothing added may linger into the next one."""
        if session.remembered(PARTS) is not None:
            session.remember(PARTS, None)

    def covers(self, instance_uid: uuid.UUID, reported_hash: bytes, digest: bytes) -> bool:
        """Whether an offer with `reported_hash` held the part `digest` (or was it alone)."""
        if not reported_hash:
            return False
        if reported_hash == digest:
            return True
        sent = self._sent.get(instance_uid)
        parts = sent.get(reported_hash) if sent is not None else None
        return parts is not None and digest in parts
