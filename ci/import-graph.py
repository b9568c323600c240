#!/usr/bin/env python3
"""The module import graph of the rafsd library crate, and its circles.

Every `crate::a::b` or `super::b` path in a module's code (not its comments or doc text) is an edge
from that module to the longest known module prefix of the path (`crate::storage::http::Keys` ->
`storage::http`). Edges between a module and its own ancestors or descendants do not count (a parent
declares its children; a child may use its parent's items). Prints the strongly connected components with more than one module (circles)
and exits 1 if there are any; `--edges` also prints every edge.

    python3 ci/import-graph.py [--edges] [SRC_DIR]
"""
import os
import re
import sys


def module_of(root, path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel == ["lib"]:
        return ""
    return "::".join(rel)


def strip_comments(text):
    # Line comments (doc comments included) and block comments; string literals are rare enough in
    # paths not to matter.
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def crate_paths(text, module):
    """Every crate:: or super:: path, as a path from the crate root, with `use crate::a::{b, c::d}`
    groups expanded one level."""
    parent = module.split("::")[:-1]
    for m in re.finditer(r"\b(crate|(?:super::)*super)((?:::\w+)+)(::\{([^}]*)\})?", text):
        rest = m.group(2).strip(":").split("::")
        if m.group(1) == "crate":
            base = rest
        else:
            up = m.group(1).count("super")
            base = parent[: len(parent) - (up - 1)] + rest if up - 1 <= len(parent) else rest
        yield base
        if m.group(4):
            for item in m.group(4).split(","):
                item = item.strip().split(" as ")[0].strip()
                if item and item != "self":
                    yield base + [p for p in item.split("::") if p and p != "{"]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    show_edges = "--edges" in sys.argv
    root = args[0] if args else os.path.join(os.path.dirname(__file__), "..", "src")
    files = {}
    for dirpath, _, names in os.walk(root):
        # src/layout is its own crate (rafs-layout), with no crate:: paths into rafsd.
        if os.path.relpath(dirpath, root).split(os.sep)[0] == "layout":
            continue
        for n in names:
            if n.endswith(".rs") and not (dirpath == root and n == "main.rs"):
                p = os.path.join(dirpath, n)
                files[module_of(root, p)] = p
    modules = set(files)
    edges = {m: set() for m in modules}
    for m, p in files.items():
        with open(p) as f:
            text = strip_comments(f.read())
        for path in crate_paths(text, m):
            for n in range(len(path), 0, -1):
                target = "::".join(path[:n])
                if target in modules:
                    # A module and its ancestors are one unit (a parent declares and re-exports
                    # its children): only edges between unrelated modules count.
                    related = (target + "::").startswith(m + "::") or m.startswith(target + "::")
                    if target != m and not related:
                        edges[m].add(target)
                    break
    # Tarjan's strongly connected components.
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

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
            comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)
    if show_edges:
        for m in sorted(edges):
            for t in sorted(edges[m]):
                print(f"{m or 'lib'} -> {t}")
    circles = [c for c in comps if len(c) > 1]
    print(f"{len(modules)} modules, {sum(len(e) for e in edges.values())} edges, {len(circles)} circles")
    for c in sorted(circles):
        inner = sorted((a, b) for a in c for b in edges[a] if b in c)
        print("circle: " + ", ".join(c))
        for a, b in inner:
            print(f"    {a} -> {b}")
    return 1 if circles else 0


if __name__ == "__main__":
    sys.exit(main())
