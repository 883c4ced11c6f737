"""The network agent: backs up this host to an appliance over HTTPS, and restores from it.

It chunks, hashes and compresses locally, asks the appliance which chunks it already has, sends only
the missing ones and commits the restore point (docs/protocol.md). It reuses the local backup walker
(repo.backup) and the safe restore (repo.restore) by giving them a repository-shaped view of the
appliance. Imports: repo and click-free modules only; from the server package only its dependency-free
certificate helpers (appliance.server.tls).
"""
