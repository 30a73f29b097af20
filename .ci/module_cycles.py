#!/usr/bin/env python3
"""Fails when the top-level modules of src/ import each other in a cycle.

wxgate's modules are layers: each may use the ones below it, never one above. This reads
every `crate::` path in src/ (in `use` lines, brace groups included, and inline), outside
test code (`#[cfg(test)]` items and the files they declare), maps each file to its
top-level module (`src/quota.rs` and `src/quota/*` are `quota`), and reports every group of
modules that reach each other, with the references that tie them.

Usage: python3 .ci/module_cycles.py [SRC_DIR]     (exit 0: no cycle; 1: cycles, listed)
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT_FILES = {"lib.rs", "main.rs"}


def strip_comments_and_strings(text):
    """Blanks out comments, string and char literals, keeping line breaks."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]):
            m = re.match(r"'(\\.|[^\\'])'", text[i:i + 4])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def strip_cfg_test(code):
    """Removes every item under `#[cfg(test)]`; returns the code and the test modules it
    declared as files (`#[cfg(test)] mod tests;`)."""
    test_files = []
    while True:
        m = re.search(r"#\[cfg\(test\)\]", code)
        if not m:
            return code, test_files
        i = m.end()
        # The item ends at its first `;` before any `{`, or at the brace matching its first `{`.
        depth, j = 0, i
        while j < len(code):
            if code[j] == ";" and depth == 0:
                decl = re.search(r"mod\s+(\w+)\s*$", code[i:j])
                if decl:
                    test_files.append(decl.group(1))
                j += 1
                break
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
                if depth == 0:
                    j += 1
                    break
            j += 1
        code = code[:m.start()] + "\n" * code.count("\n", m.start(), j) + code[j:]


def top_level_names(group):
    """The first segment of each path in a `use crate::{...}` brace group."""
    names, depth, current = [], 0, ""
    for ch in group:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            names.append(current)
            current = ""
            continue
        if depth == 0 or (depth > 0 and ch not in "{}"):
            current += ch if depth == 0 else ""
    names.append(current)
    return [re.match(r"\s*(\w+)", name).group(1) for name in names if re.match(r"\s*(\w+)", name)]


def module_of(path, src):
    rel = path.relative_to(src)
    if len(rel.parts) == 1:
        return None if rel.name in ROOT_FILES else rel.stem
    return rel.parts[0]


def references(src):
    """{(from, to): set of 'file:line name'} between top-level modules, outside test code."""
    files = sorted(src.rglob("*.rs"))
    code_of, test_files = {}, set()
    for path in files:
        code, tests = strip_cfg_test(strip_comments_and_strings(path.read_text()))
        code_of[path] = code
        for name in tests:
            base = path.parent if path.name in ("mod.rs", *ROOT_FILES) else path.with_suffix("")
            test_files.update({base / f"{name}.rs", base / name / "mod.rs"})
    edges = defaultdict(set)
    for path, code in code_of.items():
        if path in test_files:
            continue
        here = module_of(path, src)
        if here is None:
            continue
        for m in re.finditer(r"\bcrate\s*::\s*(\{|\w+)", code):
            line = code.count("\n", 0, m.start()) + 1
            if m.group(1) == "{":
                depth, j = 1, m.end()
                while j < len(code) and depth:
                    depth += {"{": 1, "}": -1}.get(code[j], 0)
                    j += 1
                targets = top_level_names(code[m.end():j - 1])
            else:
                targets = [m.group(1)]
            for target in targets:
                if target != here and target not in ("self", "super"):
                    edges[(here, target)].add(f"{path.relative_to(src.parent)}:{line}")
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main():
    src = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "src")
    edges = references(src)
    found = cycles(edges)
    if not found:
        modules = sorted({m for edge in edges for m in edge})
        print(f"no import cycle between the {len(modules)} top-level modules of {src}")
        return 0
    for component in found:
        print(f"import cycle between {len(component)} modules: {', '.join(component)}")
        for (a, b), places in sorted(edges.items()):
            if a in component and b in component:
                print(f"  {a} -> {b}: {', '.join(sorted(places)[:4])}{' ...' if len(places) > 4 else ''}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
