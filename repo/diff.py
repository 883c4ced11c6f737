"""Compare two file trees by a merged walk in name order; unchanged directory pages are skipped
without reading them, because equal page ids mean equal content."""

from __future__ import annotations

from collections.abc import Iterator

from .repository import Repository
from .snapshot import Snapshot
from .tree import TYPE_DIR, Node, TreeReader, root_node

_META = ("m", "u", "g", "mt", "x", "l", "r", "t")


def _diff_dir(tree: TreeReader, a: Node | None, b: Node | None, prefix: str) -> Iterator[tuple[str, str]]:
    if a is not None and b is not None and a.get("d") == b.get("d"):
        return
    ia = iter(tree.children(a)) if a is not None else iter(())
    ib = iter(tree.children(b)) if b is not None else iter(())
    na, nb = next(ia, None), next(ib, None)
    while na is not None or nb is not None:
        if nb is None or (na is not None and na["n"] < nb["n"]):
            yield from _gone(tree, na, prefix, "-")  # type: ignore[arg-type]
            na = next(ia, None)
        elif na is None or nb["n"] < na["n"]:
            yield from _gone(tree, nb, prefix, "+")
            nb = next(ib, None)
        else:
            path = prefix + "/" + na["n"].decode("utf-8", "surrogateescape")
            if na["t"] != nb["t"]:
                yield from _gone(tree, na, prefix, "-")
                yield from _gone(tree, nb, prefix, "+")
            elif na["t"] == TYPE_DIR:
                if any(na.get(k) != nb.get(k) for k in _META if k != "mt"):
                    yield "U", path
                yield from _diff_dir(tree, na, nb, path)
            elif na.get("c") != nb.get("c") or na.get("s") != nb.get("s"):
                yield "M", path
            elif any(na.get(k) != nb.get(k) for k in _META):
                yield "U", path
            na, nb = next(ia, None), next(ib, None)


def _gone(tree: TreeReader, node: Node, prefix: str, ch: str) -> Iterator[tuple[str, str]]:
    path = prefix + "/" + node["n"].decode("utf-8", "surrogateescape")
    yield ch, path
    if node["t"] == TYPE_DIR:
        for p, _ in tree.walk(node, path.encode("utf-8", "surrogateescape")):
            yield ch, p.decode("utf-8", "surrogateescape")


def diff_trees(repo: Repository, a: Snapshot, b: Snapshot) -> Iterator[tuple[str, str]]:
    tree = TreeReader(repo)
    yield from _diff_dir(tree, root_node(a.tree), root_node(b.tree), "")
