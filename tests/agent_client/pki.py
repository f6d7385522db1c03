"""A certificate authority and an enrolling server for the agent_client tests.

The server side uses the project's own CA code (`signing.ca`): CSRs are checked with
`check_csr` and certificates issued with `issue_certificate`, so what the agent builds is
held to the real policy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent_client.testing import SERVER_CAPABILITIES
from opamp.capabilities import ServerCapabilities
from opamp.proto import opamp_pb2 as pb
from signing.ca import CheckedCsr, CsrRejected, LoadedCa, check_csr, create_ca, issue_certificate

ENROLLING_CAPABILITIES = SERVER_CAPABILITIES | int(ServerCapabilities.ACCEPTS_CONNECTION_SETTINGS_REQUEST)
TOKEN = "opamp_et_test-secret-4711"


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(name: str = "agents", *, now: datetime | None = None, days: int = 365) -> LoadedCa:
    return create_ca(common_name=name, days=days, now=now)


def offer_for(
    cert: x509.Certificate, ca: LoadedCa | x509.Certificate, *, heartbeat: int = 0
) -> pb.ConnectionSettingsOffers:
    ca_cert = ca.cert if isinstance(ca, LoadedCa) else ca
    offer = pb.ConnectionSettingsOffers()
    offer.opamp.destination_endpoint = "wss://opamp.example/v1/opamp"
    offer.opamp.heartbeat_interval_seconds = heartbeat
    offer.opamp.certificate.cert = pem(cert)
    offer.opamp.certificate.ca_cert = pem(ca_cert)
    offer.hash = hashlib.sha256(pem(cert) + pem(ca_cert)).digest()
    return offer


def issue(
    ca: LoadedCa,
    csr_pem: bytes,
    instance_uid: bytes,
    *,
    validity: timedelta = timedelta(days=30),
    now: datetime | None = None,
) -> x509.Certificate:
    checked = check_csr(csr_pem, instance_uid=uuid.UUID(bytes=instance_uid))
    return issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=validity, now=now)


def issue_unchecked(
    ca: LoadedCa,
    *,
    public_key: ec.EllipticCurvePublicKey,
    uid: uuid.UUID,
    validity: timedelta = timedelta(days=30),
    now: datetime | None = None,
) -> x509.Certificate:
    """A certificate for any key and uid: what a broken or hostile server might send."""
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(uid))]))
        .sign(csr_key, hashes.SHA256())
    )
    checked = CheckedCsr(instance_uid=uid, public_key=public_key, key_type="ecdsa-p256", csr=csr)
    return issue_certificate(checked, ca_key=ca.key, ca_cert=ca.cert, validity=validity, now=now)


@dataclass
class EnrollingServer:
    """A responder that plays the server's side of the CSR flow.

    Every reply advertises AcceptsConnectionSettingsRequest. A CSR that fails the policy is
    answered with error_response BadRequest; otherwise, with `auto_approve`, the reply
    carries the certificate, else the CSR waits in `pending` until `approve()`.
    """

    ca: LoadedCa
    auto_approve: bool = True
    validity: timedelta = timedelta(days=30)
    heartbeat: int = 0
    now: datetime | None = None
    csrs: list[bytes] = field(default_factory=list)
    pending: list[tuple[bytes, bytes]] = field(default_factory=list)
    issued: list[x509.Certificate] = field(default_factory=list)

    def __call__(self, message: pb.AgentToServer) -> pb.ServerToAgent:
        reply = pb.ServerToAgent(instance_uid=message.instance_uid, capabilities=ENROLLING_CAPABILITIES)
        if not message.HasField("connection_settings_request"):
            return reply
        csr = message.connection_settings_request.opamp.certificate_request.csr
        self.csrs.append(csr)
        try:
            check_csr(csr, instance_uid=uuid.UUID(bytes=message.instance_uid))
        except CsrRejected as error:
            return pb.ServerToAgent(
                instance_uid=message.instance_uid,
                error_response=pb.ServerErrorResponse(
                    type=pb.ServerErrorResponseType_BadRequest, error_message=error.message
                ),
            )
        if self.auto_approve:
            reply.connection_settings.CopyFrom(self.offer(csr, message.instance_uid))
        elif (csr, message.instance_uid) not in self.pending:
            self.pending.append((csr, message.instance_uid))
        return reply

    def offer(self, csr: bytes, instance_uid: bytes) -> pb.ConnectionSettingsOffers:
        cert = issue(self.ca, csr, instance_uid, validity=self.validity, now=self.now)
        self.issued.append(cert)
        return offer_for(cert, self.ca, heartbeat=self.heartbeat)

    def approve(self) -> pb.ServerToAgent:
        """The push that delivers the oldest pending request's certificate."""
        csr, instance_uid = self.pending.pop(0)
        return pb.ServerToAgent(
            instance_uid=instance_uid,
            capabilities=ENROLLING_CAPABILITIES,
            connection_settings=self.offer(csr, instance_uid),
        )


@dataclass(frozen=True)
class ServerTls:
    """A TLS server identity for 127.0.0.1 and the CA file an agent verifies it with."""

    context: ssl.SSLContext
    ca_file: Path


def server_tls(directory: Path, *, client_ca: LoadedCa, require_client_certificate: bool) -> ServerTls:
    """A server context for 127.0.0.1 whose clients' certificates are checked against `client_ca`."""
    directory.mkdir(parents=True, exist_ok=True)
    server_ca = new_ca("server-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(server_ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(server_ca.key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.crt", directory / "server.key"
    ca_file, client_ca_file = directory / "server-ca.crt", directory / "client-ca.crt"
    cert_file.write_bytes(pem(cert))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ca_file.write_bytes(pem(server_ca.cert))
    client_ca_file.write_bytes(pem(client_ca.cert))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=client_ca_file)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    return ServerTls(context=context, ca_file=ca_file)
