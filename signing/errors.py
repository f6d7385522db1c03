"""Refusals of the signing services, as the project's one domain error type.

Every class here is a `fleet.errors.DomainError`, so the API's central handler maps it
(with its `status`) without knowing this app. A refused CSR is also a `ca.CsrRejected`, so
the OpAMP session can catch one type for "reply with error_response BadRequest".
"""

from __future__ import annotations

from fleet.errors import DomainError
from signing.ca import CsrRejected


class SigningError(DomainError):
    """A signing, certificate or enrollment operation that cannot be carried out."""


class CertificateRequestRejected(SigningError, CsrRejected):
    """A CSR refused by policy (its message is one of the `signing.ca.CSR_*` constants)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="csr", status=400)


class CsrRateLimited(SigningError, CsrRejected):
    """Too many CSRs from one agent within the window."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="csr", status=429)


class CertificateRequestHeld(SigningError, CsrRejected):
    """A CSR refused because the agent has a pending request from another credential."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="csr", status=409)


class EnrollmentTokenRefused(SigningError):
    """An enrollment secret that is unknown, expired, revoked or used up."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="token", status=401)


SIGNING_KEY_RETIRED = "signing key {key_id} was retired and may not sign again; create a new key"
SIGNING_KEY_IN_USE = (
    "signing key {key_id} signs new versions: once retired, every publish fails until "
    "OPAMP_SIGNING_KEY_FILE holds a new key (manage.py create_signing_key); "
    "activate another key first, or retire with force to accept that"
)
CA_NOT_CONFIGURED = "no certificate authority is configured (set OPAMP_CA_KEY_FILE and OPAMP_CA_CERT_FILE)"
CA_UNUSABLE = "the configured certificate authority cannot be used: {problem}"
CSR_RATE_LIMITED = "too many certificate requests from this agent: at most {limit} per hour"
REQUEST_NOT_PENDING = "certificate request {pk} was already {state}"
TOKEN_UNKNOWN = "unknown enrollment token"
TOKEN_EXPIRED = "the enrollment token has expired"
TOKEN_REVOKED = "the enrollment token was revoked"
TOKEN_EXHAUSTED = "the enrollment token has been used its maximum number of times"
TOKEN_MAX_USES_INVALID = "max_uses must be at least 1"
TOKEN_LIFETIME_INVALID = "an enrollment token must expire in the future"
TOKEN_NAME_INVALID = "the token name must be 1-200 characters"
