"""The agent's upload body: many buffers sent through one reused gather buffer, never joined."""

from __future__ import annotations

import os

from appliance.agent.client import Parts


def test_parts_yield_the_joined_bytes_every_time() -> None:
    parts = [os.urandom(n) for n in (41, 70_000, 41, 3, 0, 300_000, 41, 1_500_000, 41, 10)]
    body = Parts(parts, gather=256 * 1024)
    assert len(body) == sum(map(len, parts))
    for _ in range(2):  # a retried upload iterates again
        pieces = [bytes(p) for p in body]  # copied as sent: the gather buffer is reused
        assert b"".join(pieces) == b"".join(parts)
        # parts at least as large as the buffer go as they are; the small ones are gathered between them
        assert [len(p) for p in pieces] == [70_085, 300_000, 41, 1_500_000, 51]
        assert pieces[1] == parts[5] and pieces[3] == parts[7]
