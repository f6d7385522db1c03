"""X.509 rules the agent and the server both apply to the certificates they exchange."""

from __future__ import annotations

from cryptography import x509


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """basicConstraints CA:true; a certificate without the extension is no CA."""
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
