"""The agent's handling of remote config offers.

`RemoteConfigHandling` decides which hash an offer is known by (an offer already received
is not applied again), reports APPLYING, applies (with trusted keys the signature is
checked first, then the drill failures, then the files are installed in the agent's
state) and reports APPLIED with the effective config, or FAILED with the reason. The
config files and their checks are `agent_client.remote_config`; the signature check is
`agent_client.signed_config`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace

from agent_client import report
from agent_client.agent_base import AgentBase
from agent_client.remote_config import ConfigFile, ConfigRejected, check_remote_config
from agent_client.signed_config import content_hash, record_signing, verify_remote_config
from agent_client.state import RemoteConfigRecord
from opamp.hashing import config_map_hash
from opamp.proto import opamp_pb2 as pb


class RemoteConfigHandling(AgentBase):
    """Remote config for `agent_client.agent.Agent`."""

    async def _on_remote_config(self, remote: pb.AgentRemoteConfig) -> None:
        if not self.settings.accept_remote_config:
            self._log.warning("ignoring a remote config: AcceptsRemoteConfig is not declared")
            return
        # The server always sets config_hash; hashing here keeps an unhashed offer from
        # matching the empty hash of an agent that never received a config.
        files = report.config_files(remote.config)
        if remote.config_hash:
            config_hash = remote.config_hash
        elif self.settings.requires_signed_config:
            config_hash = content_hash(files)  # what the signature covers
        else:
            config_hash = config_map_hash(files)
        # Compared with the last hash received, not the last applied: a config that failed
        # is not retried in a loop, and a rollback to the applied one is applied again.
        if config_hash == self._remote.last_hash:
            return
        previous = self._remote
        self._remote = replace(
            previous,
            last_hash=config_hash,
            status=pb.RemoteConfigStatuses_APPLYING,
            error_message="",
        )
        self._log.info("applying remote config %s (%d files)", config_hash.hex()[:16], len(files))
        try:
            await self._send_report(remote_config_status=True)
            outcome = await self._apply(files, config_hash, previous)
        except BaseException:
            # The session ended mid-apply. Reporting APPLYING for this hash on the next
            # session would stop the server from offering it again, and nothing would finish
            # the apply: fall back to the last outcome so the offer is repeated.
            self._remote = previous
            raise
        self._remote = outcome
        try:
            await asyncio.to_thread(self._state.save_remote_config, outcome)
        except OSError as error:
            self._log.error("could not persist the remote config status: %s", error)

        if outcome.status == pb.RemoteConfigStatuses_APPLIED:
            self._log.info("remote config %s applied", config_hash.hex()[:16])
            self._config_applied()
            await self._send_report(remote_config_status=True, effective_config=True)
        else:
            self._log.warning("remote config %s failed: %s", config_hash.hex()[:16], outcome.error_message)
            await self._send_report(remote_config_status=True)

    async def _apply(
        self, files: Mapping[str, ConfigFile], config_hash: bytes, previous: RemoteConfigRecord
    ) -> RemoteConfigRecord:
        """Check and install `files`; the outcome is APPLIED, or FAILED with the reason.

        With trusted keys, the signature is checked first and only the files it covers
        (never the signature file) are checked, installed and reported as effective.
        """
        failed = replace(previous, last_hash=config_hash, status=pb.RemoteConfigStatuses_FAILED)
        signings = previous.signings
        if self.settings.apply_delay:
            await asyncio.sleep(self.settings.apply_delay)
        try:
            if self.settings.trusted_keys is not None:
                verified = verify_remote_config(
                    files,
                    offered_hash=config_hash,
                    trusted_keys=self.settings.trusted_keys,
                    applied=previous.signings,
                )
                files = verified.files
                signings = record_signing(previous.signings, verified.envelope)
            check_remote_config(
                files,
                fail_if_contains=self.settings.fail_if_contains,
                fail_apply=self.settings.fail_apply,
            )
            await asyncio.to_thread(self._state.install_config, files)
        except ConfigRejected as error:
            return replace(failed, error_message=str(error))
        except OSError as error:
            return replace(failed, error_message=f"config write failed: {error}")
        return RemoteConfigRecord(
            last_hash=config_hash,
            status=pb.RemoteConfigStatuses_APPLIED,
            applied_hash=config_hash,
            files=files,
            signings=signings,
        )
