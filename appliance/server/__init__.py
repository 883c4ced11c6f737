"""The appliance daemon: an HTTPS API through which network agents back up into the shared repository.

Layering (docs/protocol.md §1): ``http`` speaks HTTP/1.1 (h11 over trio streams) and knows nothing of
backups; ``app`` is the routing table with authentication and roles; ``api`` holds the v1 handlers;
``ingest`` turns verified agent uploads into repository blobs and restore points; ``state`` is the
server's own LMDB (tokens, tenants, per-tenant id maps, upload sessions); ``daemon`` wires them into a
process. Imports point one way: appliance.server -> repo, never the reverse; the agent never imports it.
"""
