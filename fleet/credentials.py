"""Who speaks on an OpAMP connection, as the fleet sees it: the credential types and the
calls the session needs from whoever checks credentials (a `CredentialAuthority`).

The fleet does not know how a credential is checked: the app that issues them (signing:
enrollment tokens, client certificates of its CA) registers an authority through its
`FleetExtension` (fleet.extensions). Without one, every agent is anonymous and every
anonymous agent is admitted: what the tests of the fleet alone run with.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from fleet import services


class CredentialRefused(Exception):
    """The connection's credential is missing or not acceptable; `message` says which."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CredentialKind(Enum):
    ANONYMOUS = "anonymous"
    TOKEN = "token"
    CERTIFICATE = "certificate"


@dataclass(frozen=True)
class PresentedCredentials:
    """What a connection brought, before anything is looked up."""

    bearer: str = ""
    client_cert_pem: bytes = b""


SPEAKS_FOR_OTHER = "the client certificate belongs to agent {bound}; this connection may not speak for {claimed}"


@dataclass(frozen=True)
class AgentCredential:
    """An accepted credential. A certificate binds the connection to one instance_uid."""

    kind: CredentialKind
    token_id: int | None = None
    token_auto_approve: bool = False
    bound_uid: uuid.UUID | None = None
    fingerprint_sha256: str = ""
    # From this moment the certificate is due for renewal (a third of its validity left).
    renew_after: datetime | None = None

    @property
    def is_certificate(self) -> bool:
        return self.kind is CredentialKind.CERTIFICATE

    def identity_problem(self, instance_uid: uuid.UUID) -> str | None:
        """Why this credential may not speak for `instance_uid`, or None when it may."""
        if self.bound_uid is not None and self.bound_uid != instance_uid:
            return SPEAKS_FOR_OTHER.format(bound=self.bound_uid, claimed=instance_uid)
        return None


ANONYMOUS = AgentCredential(kind=CredentialKind.ANONYMOUS)


class CredentialAuthority:
    """What the session asks about credentials. The defaults are an authority that knows
    none: every agent is anonymous and may speak for any instance_uid.

    The calls that read or write the database are synchronous; the session runs them
    through `fleet.db.db`.
    """

    def admits_anonymous(self) -> bool:
        """Whether a connection presenting no credential is admitted (then without a database trip)."""
        return True

    def authenticate(self, presented: PresentedCredentials) -> AgentCredential:
        """The credential a connection may proceed with, or CredentialRefused (-> 401)."""
        return ANONYMOUS

    def identity_check(self, credential: AgentCredential, instance_uid: uuid.UUID) -> None:
        """May a token connection speak for `instance_uid`? CredentialRefused if not. Read-only:
        run before anything of the message changes, once per connection and uid."""

    def enrollment_record(self, credential: AgentCredential, instance_uid: uuid.UUID) -> dict[str, str]:
        """Count `instance_uid` as enrolled by the connection's token; the labels still to
        apply once the agent is inventoried. CredentialRefused when the token may not enrol it."""
        return {}

    def enrollment_labels_apply(self, *, instance_uid: uuid.UUID, labels: dict[str, str]) -> None:
        """Apply what `enrollment_record` returned to the newly inventoried agent."""

    def instance_uid_reassign(self, *, credential: AgentCredential, old: uuid.UUID, new: uuid.UUID) -> bool:
        """Move an agent that asked for a new instance_uid (RequestInstanceUid) to `new`,
        when `credential` owns the old uid; False when nothing moved."""
        return services.agent_instance_uid_move(old=old, new=new)

    def still_valid(self, credential: AgentCredential) -> bool:
        """Re-check a live connection's credential (after a revocation hint)."""
        return True


# The authority of a fleet without a credential-issuing app.
NO_AUTHORITY = CredentialAuthority()
