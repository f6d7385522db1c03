"""What signing plugs into the fleet (registered in `SigningConfig.ready`): it checks agent
credentials (enrollment tokens, client certificates), and in the OpAMP session takes CSRs
and offers certificates."""

from __future__ import annotations

from fleet.credentials import CredentialAuthority
from fleet.extensions import FleetExtension
from fleet.session_contributor import SessionContributor
from fleet.session_runtime import FleetRuntime
from signing.agent_credentials import SigningAuthority
from signing.session_contributor import CertificateContributor

_AUTHORITY = SigningAuthority()


class SigningFleetExtension(FleetExtension):
    name = "signing"

    def session_contributor(self, runtime: FleetRuntime) -> SessionContributor:
        return CertificateContributor(runtime)

    def credential_authority(self) -> CredentialAuthority:
        return _AUTHORITY
