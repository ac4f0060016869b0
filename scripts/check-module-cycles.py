#!/usr/bin/env python3
"""Fail when the top-level modules of src/ import each other in a circle.

A top-level module is src/NAME.rs or src/NAME/ (with everything under it).
An edge A -> B is any `crate::B` path in A's code (a `use` line, grouped
`use crate::{B, ...}` included, or an inline `crate::B::x`); comments are
ignored. Prints the graph's strongly connected components larger than one
module, each with one witness line per edge, and exits 1 when there is one.

Usage: scripts/check-module-cycles.py [SRC_DIR]   (default: src)
"""
import re
import sys
from pathlib import Path

SRC = Path(sys.argv[1] if len(sys.argv) > 1 else "src")
ROOTS = {"lib.rs", "main.rs"}


def top_module(path: Path) -> str | None:
    rel = path.relative_to(SRC)
    if len(rel.parts) == 1:
        return None if rel.name in ROOTS else rel.stem
    return rel.parts[0]


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)  # string literals
    return re.sub(r"//[^\n]*", "", text)


def references(text: str):
    """(line number, top-level module) for each crate:: reference."""
    for m in re.finditer(r"\bcrate::(\{[^}]*\}|\w+)", text):
        line = text.count("\n", 0, m.start()) + 1
        target = m.group(1)
        if target.startswith("{"):
            # `use crate::{a::b, c, d::{e, f}}`: the first segment of each item.
            depth, item, names = 0, "", []
            for ch in target[1:-1] + ",":
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "," and depth == 0:
                    names.append(item.strip().split("::")[0])
                    item = ""
                    continue
                item += ch
            for n in names:
                if n:
                    yield line, n
        else:
            yield line, target


def main() -> int:
    modules = {top_module(p) for p in SRC.rglob("*.rs")} - {None}
    edges: dict[str, dict[str, str]] = {m: {} for m in modules}
    for path in sorted(SRC.rglob("*.rs")):
        src = top_module(path)
        if src is None:
            continue
        for line, dst in references(strip_comments(path.read_text())):
            if dst in modules and dst != src:
                edges[src].setdefault(dst, f"{path}:{line}")

    # Tarjan's strongly connected components.
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)

    cycles = [c for c in sccs if len(c) > 1]
    n_edges = sum(len(e) for e in edges.values())
    if not cycles:
        print(f"no import cycle among {len(modules)} top-level modules ({n_edges} edges)")
        return 0
    for comp in cycles:
        print("import cycle among: " + ", ".join(comp))
        for a in comp:
            for b in sorted(edges[a]):
                if b in comp:
                    print(f"  {a} -> {b}   ({edges[a][b]})")
    return 1


if __name__ == "__main__":
    sys.exit(main())
