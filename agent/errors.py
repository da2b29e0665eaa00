"""One exception root for the agent, with codes shared with the wire protocol.

Every expected failure on the device is an ``AgentError``; the CLI turns one
into a single log line and an exit status, the service loop decides from
``code.retryable`` whether to wait and try again.
"""

from __future__ import annotations

from agent.protocol import ErrorCode, ProtocolError


class AgentError(Exception):
    """Root of every expected agent-side failure."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(AgentError):
    """The configuration file, an option or an environment variable is invalid."""


class IdentityError(AgentError):
    """The board's identity (MAC address, serial number) cannot be read from sysfs/procfs."""


class KeyStoreError(AgentError):
    """A private key is missing, malformed, badly protected, or would be overwritten."""


class StorageError(AgentError):
    """On-disk state (directories, certificate store, JSON files) is unusable."""


class ProvisioningRejected(AgentError):
    """The server answered a request with an error; ``error`` is what it sent."""

    def __init__(self, error: ProtocolError) -> None:
        super().__init__(f"server rejected the request: {error}")
        self.error = error
        self.code = error.code
        self.retry_after = error.retry_after


class SerialProtocolError(AgentError):
    """A frame on the factory serial link is malformed, out of sequence or fails its CRC."""

    code = ErrorCode.BAD_REQUEST
