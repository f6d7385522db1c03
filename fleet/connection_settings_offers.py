"""One ConnectionSettingsOffers per reply, filled by several contributors, hashed once.

Signing offers a certificate (`opamp`), the fleet offers telemetry destinations and a
heartbeat interval (fleet.connection_settings_contributor); both fill the same
`ServerToAgent.connection_settings` at `ReplyPart.CONNECTION_SETTINGS`, and the fleet's
`ReplyPart.CONNECTION_SETTINGS_HASH` step then sets the hash over the whole message, as
the protocol wants ("hash of all settings"). The agent answers with that hash, so a
contributor cannot recognise its own part in it by its own digest alone: each contributor
names the digest of the part it added (`adding`), the sealing step records which parts each
sent hash held (`sealed`), and every hash an agent reports (`reported`) marks the parts it
held as answered. An agent reports only its last offer's hash: one that applied the
telemetry settings and then a certificate offer alone reports the certificate's, and still
holds the settings, so what it answered accumulates (`answered`: the newest few parts).

The ledger is per server process (FleetRuntime) and outlives an agent's connection (the
next one opens with the hash it holds). A hash of an offer made alone is its part's digest,
so it is recognised after a restart too; a merged offer's hash is not, which costs at most
one repeated offer of each part.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fleet.session import AgentSession

# Sent offers remembered per agent: the newest few are all an answer can refer to.
KEEP_SENT = 4
# Answered parts remembered per agent: a few contributors, each with its current part and
# the ones before it.
KEEP_ANSWERED = 8


class _PartsKey:
    """The session memo key of the parts added to the reply being composed."""


PARTS = _PartsKey()


def _keep(entries: OrderedDict[bytes, frozenset[bytes]], key: bytes, value: frozenset[bytes], limit: int) -> None:
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > limit:
        entries.popitem(last=False)


class SettingsOfferLedger:
    def __init__(self) -> None:
        self._sent: dict[uuid.UUID, OrderedDict[bytes, frozenset[bytes]]] = {}
        self._answered: dict[uuid.UUID, OrderedDict[bytes, frozenset[bytes]]] = {}

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
        _keep(self._sent.setdefault(instance_uid, OrderedDict()), offer_hash, frozenset(parts or ()), KEEP_SENT)

    def discard_parts(self, session: AgentSession) -> None:
        """A reply composed without offers: nothing added may linger into the next one."""
        if session.remembered(PARTS) is not None:
            session.remember(PARTS, None)

    def reported(self, instance_uid: uuid.UUID, offer_hash: bytes) -> None:
        """The agent reported a connection settings status for `offer_hash` (applied,
        applying or failed): that hash, and every part it held, count as answered. An
        empty hash: the agent holds no settings of ours."""
        if not offer_hash:
            self._answered.pop(instance_uid, None)
            return
        answered = self._answered.setdefault(instance_uid, OrderedDict())
        sent = self._sent.get(instance_uid)
        parts = sent.get(offer_hash) if sent is not None else None
        for part in (offer_hash, *(parts or ())):
            _keep(answered, part, frozenset(), KEEP_ANSWERED)

    def answered(self, instance_uid: uuid.UUID, digest: bytes) -> bool:
        """Whether the agent answered an offer that held the part `digest`."""
        answered = self._answered.get(instance_uid)
        return answered is not None and digest in answered
