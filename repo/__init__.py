"""The chunk repository: chunking, deduplication, compression, encryption, packs, index, restore points.

Layer rule: ``repo`` imports nothing from ``fusefs`` or ``appliance`` and knows nothing of FUSE, click,
sockets or HTTP. Everything above it reads and writes backups through the names exported here.
"""
