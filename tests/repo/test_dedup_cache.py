from __future__ import annotations

import os
import time
from pathlib import Path

from repo.backup import BackupOptions, backup_paths
from repo.check import repository_info
from repo.repository import Repository

MiB = 1024 * 1024


def test_dedup_across_hosts_and_files_cache(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # Chunk boundaries follow the repository's secret seed (1 MiB average, 4 MiB at most): 16 MiB spans
    # enough chunks for "an edit stores about one chunk" to hold for every seed.
    blob = os.urandom(16 * MiB)
    (src / "a.bin").write_bytes(blob)
    (src / "copy.bin").write_bytes(blob)  # identical content inside one backup
    text = b"log line\n" * 2_000_000  # 18 MB that zstd shrinks ~1000x
    (src / "text").write_bytes(text)
    s1 = backup_paths(repo, [str(src)], BackupOptions(host="web1"))
    assert s1.stats["new_bytes"] <= len(blob) + len(text) + 64 * 1024  # copy.bin stored once
    s2 = backup_paths(repo, [str(src)], BackupOptions(host="web2"))  # another host, same data
    assert s2.stats["read_bytes"] > 0  # web2 has no files cache entries: it reads...
    assert s2.stats["new_bytes"] < 50_000  # ...but stores only its tree pages
    s3 = backup_paths(repo, [str(src)], BackupOptions(host="web1"))
    assert s3.stats["read_bytes"] == 0 and s3.stats["cached_files"] == 3  # unchanged files are not read
    with open(src / "a.bin", "r+b") as f:  # a small edit re-reads only that file, stores the chunk(s) around it
        f.seek(1_000_000)
        f.write(b"changed")
    time.sleep(0.01)
    s4 = backup_paths(repo, [str(src)], BackupOptions(host="web1"))
    assert s4.stats["cached_files"] == 2
    assert s4.stats["new_bytes"] <= 2 * repo.config.cdc_max + 64 * 1024 < len(blob)  # not the whole file
    info = repository_info(repo)
    assert info["dedup_ratio"] > 3 and info["compression_ratio"] > 1.5


def test_files_cache_ignores_entries_whose_chunks_vanished(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    backup_paths(repo, [str(src)], BackupOptions(host="h"))
    repo.index.clear(["chunks"])  # as if GC had removed them
    s = backup_paths(repo, [str(src)], BackupOptions(host="h"))
    assert s.stats["cached_files"] == 0 and s.stats["new_bytes"] >= 100_000
