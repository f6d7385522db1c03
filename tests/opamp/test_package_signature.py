"""The package-file signature both sides share: what verifies and every way it must not."""

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from opamp.config_signature import BadSignature, MalformedSignature, UnknownSigningKey, key_id_for
from opamp.package_signature import (
    PackageContentMismatch,
    PackageEnvelope,
    PackageMismatch,
    SignedPackageFile,
    sign_package_file,
    verify_package_file,
)

CONTENT = b"\x7fELF a collector binary"
DIGEST = hashlib.sha256(CONTENT).hexdigest()


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def signed(key, package="otelcol", version="2.0.0", sha256=DIGEST):
    envelope = PackageEnvelope(package=package, version=version, sha256=sha256, key_id=key_id_for(key.public_key()))
    return sign_package_file(envelope, key.sign).to_json_bytes()


def verify(document, key, **overrides):
    arguments = {"package": "otelcol", "version": "2.0.0", "content_sha256": DIGEST}
    arguments.update(overrides)
    return verify_package_file(document, trusted_keys={key_id_for(key.public_key()): key.public_key()}, **arguments)


def test_a_genuine_signature_verifies(key):
    envelope = verify(signed(key), key)
    assert (envelope.package, envelope.version, envelope.sha256) == ("otelcol", "2.0.0", DIGEST)


def test_other_bytes_are_refused(key):
    with pytest.raises(PackageContentMismatch):
        verify(signed(key), key, content_sha256=hashlib.sha256(CONTENT + b"!").hexdigest())


@pytest.mark.parametrize("overrides", [{"package": "other"}, {"version": "1.0.0"}])
def test_a_signature_of_another_package_or_version_is_refused(key, overrides):
    with pytest.raises(PackageMismatch):
        verify(signed(key), key, **overrides)


def test_an_untrusted_key_is_refused(key):
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(UnknownSigningKey):
        verify(signed(stranger), key)


def test_an_edited_envelope_does_not_verify(key):
    document = json.loads(signed(key))
    document["envelope"]["version"] = "3.0.0"
    with pytest.raises(BadSignature):
        verify(json.dumps(document).encode(), key, version="3.0.0")


def test_a_signature_made_for_a_config_is_not_a_package_signature(key):
    # The same key signing the same JSON under the config domain must not verify here.
    envelope = PackageEnvelope(package="otelcol", version="2.0.0", sha256=DIGEST, key_id=key_id_for(key.public_key()))
    body = json.dumps(envelope.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    forged = sign_package_file(envelope, lambda _: key.sign(b"opamp-signed-config/v2\n" + body))
    with pytest.raises(BadSignature):
        verify(forged.to_json_bytes(), key)


@pytest.mark.parametrize(
    "document",
    [b"", b"not json", b"[]", b'{"envelope": {}, "signature": "x"}', b"x" * 20000, b'{"envelope": 1, "signature": 2}'],
)
def test_malformed_documents_get_a_clear_error(key, document):
    with pytest.raises(MalformedSignature):
        verify(document, key)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_escape_as_anything_but_a_signature_error(document):
    key = Ed25519PrivateKey.generate()
    with pytest.raises((MalformedSignature, UnknownSigningKey, BadSignature, PackageContentMismatch, PackageMismatch)):
        verify(document, key)


def test_the_document_round_trips(key):
    document = signed(key)
    assert SignedPackageFile.from_json_bytes(document).to_json_bytes() == document
