"""Agent errors, in the project's one hierarchy (repo.errors.IhbError); exit codes 64-70
(docs/protocol.md §9)."""

from __future__ import annotations

from repo.errors import IhbError


class AgentError(IhbError):
    """The agent could not complete its work."""

    exit_code = 64


class ServerUnreachable(AgentError):
    """The appliance cannot be reached; check --server and the network, then retry (uploads resume)."""

    exit_code = 65


class AuthFailed(AgentError):
    """The appliance refused the token; check --token-file or create a token with `ihb token create`."""

    exit_code = 66


class ServerRejected(AgentError):
    """The appliance rejected a request."""

    exit_code = 67


class CertificateMismatch(AgentError):
    """The appliance's certificate does not match the pinned fingerprint; check --fingerprint."""

    exit_code = 68


class HookFailed(AgentError):
    """A --pre-hook or --post-hook command failed."""

    exit_code = 69


class DumpFailed(AgentError):
    """A --stdin-name dump command failed; the backup was not committed."""

    exit_code = 70


class MissingReferences(ServerRejected):
    """The appliance no longer has blobs the files cache remembers; the agent sends them again."""

    exit_code = 67
