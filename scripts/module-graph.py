#!/usr/bin/env python3
"""The dependency graph between the library's top-level modules, and a check that it has no
cycles (the test command runs it; a cycle fails it).

A module's dependencies are the other top-level modules its files name through `crate::`
paths: `crate::auth::...`, `use crate::{auth, config::X}`, in code and in its test files.
Comments are not read. `main.rs` is the binary, a crate of its own; it is shown, not checked.

    scripts/module-graph.py            the graph as text, then the checks: no cycles, and
                                       ARCHITECTURE.md's Mermaid flowchart is this graph
    scripts/module-graph.py --mermaid  the graph as a Mermaid flowchart (for ARCHITECTURE.md)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def top_level(path: Path) -> str:
    rel = path.relative_to(SRC)
    if len(rel.parts) == 1:
        return rel.stem
    return rel.parts[0]


def group_names(text: str, start: int) -> list[str]:
    """Top-level names of the brace group opening at text[start] == '{'."""
    depth, names, current = 0, [], ""
    for ch in text[start:]:
        if ch == "{":
            depth += 1
            if depth == 1:
                continue
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        if depth == 1:
            if ch == ",":
                names.append(current)
                current = ""
            else:
                current += ch
    names.append(current)
    out = []
    for n in names:
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", n)
        if m:
            out.append(m.group(1))
    return out


def dependencies(modules: set[str]) -> dict[str, set[str]]:
    deps: dict[str, set[str]] = {m: set() for m in modules}
    for path in sorted(SRC.rglob("*.rs")):
        me = top_level(path)
        if me not in deps:
            continue
        text = strip_comments(path.read_text())
        for m in re.finditer(r"\bcrate::", text):
            rest = text[m.end():]
            if rest.startswith("{"):
                names = group_names(text, m.end())
            else:
                ident = re.match(r"[A-Za-z_][A-Za-z0-9_]*", rest)
                names = [ident.group(0)] if ident else []
            for n in names:
                if n in modules and n != me:
                    deps[me].add(n)
    return deps


def cycles(deps: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(deps[v]):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(deps):
        if v not in index:
            visit(v)
    return out


def mermaid(deps: dict[str, set[str]]) -> str:
    lines = ["flowchart TD"]
    for m in sorted(deps):
        for d in sorted(deps[m]):
            lines.append(f"    {m} --> {d}")
    return "\n".join(lines)


def main() -> int:
    lib = strip_comments((SRC / "lib.rs").read_text())
    modules = set(re.findall(r"^\s*pub mod ([a-z_]+);", lib, flags=re.M))
    deps = dependencies(modules)
    if "--mermaid" in sys.argv:
        print(mermaid(deps))
        return 0
    width = max(map(len, deps))
    for m in sorted(deps):
        print(f"{m:<{width}} -> {', '.join(sorted(deps[m])) or '(none)'}")
    found = cycles(deps)
    if found:
        for c in found:
            print(f"module-graph: CYCLE between {', '.join(c)}", file=sys.stderr)
            for m in c:
                inside = sorted(deps[m] & set(c))
                print(f"  {m} -> {', '.join(inside)}", file=sys.stderr)
        return 1
    doc = (SRC.parent / "ARCHITECTURE.md").read_text()
    drawn = re.search(r"```mermaid\n(flowchart TD\n.*?)\n```", doc, flags=re.S)
    if not drawn or drawn.group(1).strip() != mermaid(deps):
        print("module-graph: ARCHITECTURE.md's flowchart is not this graph; replace it with the "
              "output of scripts/module-graph.py --mermaid", file=sys.stderr)
        return 1
    print(f"module-graph: {len(deps)} modules, no cycles; ARCHITECTURE.md shows this graph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
