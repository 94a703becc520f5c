#!/usr/bin/env python3
"""Layering check for src/ (docs/DESIGN.md, "Where things are").

Reads every `crate::`, `super::` and `self::` path in the library's source files
(comments and strings stripped, `use` trees expanded, `pub use` re-exports followed
to the module that defines the item), and fails when
  * two sibling modules import each other, directly or round a longer cycle (a
    parent's own functions count as one more sibling, so a child calling back into
    its parent's function is a cycle too; an ancestor's types and constants are
    shared vocabulary and draw no arrow), or
  * an import points against a declared order: the `Import order` lines of
    docs/DESIGN.md, one per parent module, lowest first; a module listed there may
    import only modules listed before it, and every (non-test) child module of a
    listed parent must be listed (so the list is the tree).
The binary (src/main.rs, src/cli/) is a separate crate and is not checked, nor is
test-only code (`#[cfg(test)]` items and modules).
Run from anywhere: python3 scripts/layering.py [--graph]
"""
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SRC = os.path.join(ROOT, "src")
BIN_ONLY = {"main.rs", "cli"}


def strip(text):
    """Drop comments, string and char literals (keep lifetimes and newlines)."""
    out, i, n = [], 0, len(text)
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
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:i + 20]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'r(#*)"', text[i:])
            end = text.find('"' + m.group(1), i + len(m.group(0)))
            i = n if end < 0 else end + 1 + len(m.group(1))
            out.append('""')
        elif c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
            out.append('""')
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", text[i:])
            if m:
                i += len(m.group(0))
                out.append("' '")
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|::|\S")


def tokens(text):
    return TOKEN.findall(strip(text))


def file_modules():
    """Map each library source file to its module path (a tuple of names)."""
    mods = {}
    for dirpath, dirnames, filenames in os.walk(SRC):
        rel = os.path.relpath(dirpath, SRC)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        if parts and parts[0] in BIN_ONLY:
            continue
        for f in filenames:
            if not f.endswith(".rs") or (not parts and f in BIN_ONLY):
                continue
            path = os.path.join(dirpath, f)
            if not parts and f == "lib.rs":
                mods[path] = ()
            elif f == "mod.rs":
                mods[path] = parts
            else:
                mods[path] = parts + (f[:-3],)
    # `#[path = "x.rs"] mod name;` declarations; test-only files are left out
    for path, mod in list(mods.items()):
        with open(path) as fh:
            text = fh.read()
        for m in re.finditer(r'#\[path\s*=\s*"([^"]+)"\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;', text):
            target = os.path.normpath(os.path.join(os.path.dirname(path), m.group(1)))
            if target in mods:
                mods[target] = mod + (m.group(2),)
    test_only = set()
    for path, mod in mods.items():
        with open(path) as fh:
            _, names = skip_test_items(tokens(fh.read()))
        test_only |= {mod + (n,) for n in names}
    return {p: m for p, m in mods.items() if not any(m[:len(t)] == t for t in test_only)}


def parse_tree(toks, i):
    """Parse a use tree or a plain path from toks[i]; return (paths, next index)."""
    if toks[i] == "{":
        paths, i = [], i + 1
        while i < len(toks) and toks[i] != "}":
            if toks[i] == ",":
                i += 1
                continue
            sub, i = parse_tree(toks, i)
            paths.extend(sub)
        return paths, i + 1
    if toks[i] == "*":
        return [["*"]], i + 1
    if not re.match(r"[A-Za-z_]", toks[i]):
        return [], i
    head, i = toks[i], i + 1
    if i + 1 < len(toks) and toks[i] == "::":
        sub, i = parse_tree(toks, i + 1)
        return [[head] + p for p in sub] or [[head]], i
    return [[head]], i


def skip_test_items(toks):
    """Drop `#[cfg(test)]` items; return (tokens, names of `#[cfg(test)] mod x;`)."""
    out, test_mods, i = [], set(), 0
    attr = ["#", "[", "cfg", "(", "test", ")", "]"]
    while i < len(toks):
        if toks[i:i + 7] == attr:
            i += 7
            while toks[i] == "#":  # further attributes
                d, i = 0, i + 1
                while True:
                    d += {"[": 1, "]": -1}.get(toks[i], 0)
                    i += 1
                    if d == 0:
                        break
            start, d = i, 0
            while i < len(toks):
                t = toks[i]
                i += 1
                if t == "{":
                    d += 1
                elif t == "}":
                    d -= 1
                    if d == 0:
                        break
                elif t == ";" and d == 0:
                    item = toks[start:i]
                    if "mod" in item:
                        test_mods.add(item[item.index("mod") + 1])
                    break
            continue
        out.append(toks[i])
        i += 1
    return out, test_mods


def scan(path, mod, modules):
    """Yield (module, path segments, is_pub_use) for each path into a module."""
    with open(path) as fh:
        toks, _ = skip_test_items(tokens(fh.read()))
    scopes = [(mod, 0)]  # inline `mod x {` blocks
    depth, i, pending = 0, 0, None
    while i < len(toks):
        t = toks[i]
        if t == "mod" and i + 2 < len(toks) and toks[i + 2] == "{":
            pending = toks[i + 1]
        elif t == "{":
            depth += 1
            if pending:
                scopes.append((scopes[-1][0] + (pending,), depth))
                pending = None
        elif t == "}":
            if scopes[-1][1] == depth and len(scopes) > 1:
                scopes.pop()
            depth -= 1
        elif t in ("crate", "super", "self") and i + 1 < len(toks) and toks[i + 1] == "::" and (i == 0 or toks[i - 1] != "::"):
            is_use = False
            j = i - 1
            if j >= 0 and toks[j] == "use":
                is_use = True
            pub = is_use and j >= 1 and (toks[j - 1] == "pub" or toks[j - 1] == ")")
            paths, i2 = parse_tree(toks, i)
            if is_use or t != "self":
                for p in paths:
                    yield scopes[-1][0], p, pub
            i = max(i2, i + 1)
            continue
        elif (re.match(r"[a-z_]", t) and i + 1 < len(toks) and toks[i + 1] == "::"
              and (i == 0 or toks[i - 1] != "::") and scopes[-1][0] + (t,) in modules):
            is_use = i >= 1 and toks[i - 1] == "use"
            pub = is_use and i >= 2 and toks[i - 2] in ("pub", ")")
            paths, i2 = parse_tree(toks, i)
            for p in paths:
                yield scopes[-1][0], ["self"] + p, pub
            i = max(i2, i + 1)
            continue
        i += 1


def resolve(cur, segs, modules):
    """Absolute (module, rest) for a path written in module cur."""
    base, k = list(cur), 0
    if segs[0] == "crate":
        base, k = [], 1
    elif segs[0] == "self":
        k = 1
    while k < len(segs) and segs[k] == "super":
        base, k = base[:-1], k + 1
    if segs[0] == "super" and k == 0:
        pass
    while k < len(segs) and tuple(base + [segs[k]]) in modules:
        base.append(segs[k])
        k += 1
    return tuple(base), segs[k:]


def main():
    files = file_modules()
    modules = set(files.values())
    for m in list(modules):
        for n in range(len(m)):
            modules.add(m[:n])
    raw = []
    for path, mod in sorted(files.items()):
        for cur, segs, pub in scan(path, mod, modules):
            raw.append((path, mod, cur, segs, pub))
    # re-exports: (module, name) -> module defining it
    reexport = {}
    for path, mod, cur, segs, pub in raw:
        if pub and segs[-1] not in ("*", "self") and cur == mod:
            target, rest = resolve(cur, segs, modules)
            if rest:
                reexport[(mod, rest[-1])] = target

    def follow(target, rest):
        seen = 0
        while rest and (target, rest[0]) in reexport and seen < 20:
            target, rest = reexport[(target, rest[0])], rest[1:]
            seen += 1
        return target, rest

    edges = {}  # (src file module, target module) -> first file
    for path, mod, cur, segs, pub in raw:
        if pub:
            continue  # a re-export: its users' arrows are followed to the definition
        target, rest = resolve(cur, segs, modules)
        target, rest = follow(target, rest)
        if target == mod[:len(target)] and not (rest and re.match(r"[a-z_]", rest[0])):
            continue  # an ancestor's types and constants are shared vocabulary
        if target != mod:
            edges.setdefault((mod, target), os.path.relpath(path, ROOT))

    SELF = "(own functions)"
    graphs = {}  # parent -> {node: {node: file}}
    for (s, t), where in edges.items():
        n = 0
        while n < min(len(s), len(t)) and s[n] == t[n]:
            n += 1
        parent = s[:n]
        a = s[n] if n < len(s) else SELF
        b = t[n] if n < len(t) else SELF
        if a == b:
            continue
        g = graphs.setdefault(parent, {})
        g.setdefault(a, {}).setdefault(b, where)

    failures = []
    for parent, g in sorted(graphs.items()):
        for comp in sccs(g):
            if len(comp) > 1:
                arrows = ["%s -> %s (%s)" % (a, b, g[a][b]) for a in sorted(comp) for b in sorted(g.get(a, {})) if b in comp]
                failures.append("cycle in %s: %s" % ("::".join(("crate",) + parent), "; ".join(arrows)))
    for parent, order in declared_orders().items():
        g = graphs.get(parent, {})
        rank = {name: k for k, name in enumerate(order)}
        for name in order:
            if parent + (name,) not in modules:
                failures.append("%s lists %s, which is not a module" % ("::".join(("crate",) + parent), name))
        for m in sorted(modules):
            if len(m) == len(parent) + 1 and m[:-1] == parent and m[-1] not in rank:
                failures.append("%s: module %s is not in the order of docs/DESIGN.md" % ("::".join(("crate",) + parent), m[-1]))
        for a, outs in g.items():
            for b, where in outs.items():
                if a in rank and b in rank and rank[b] > rank[a]:
                    failures.append("%s: %s imports %s, listed after it (%s)" % ("::".join(("crate",) + parent), a, b, where))
    if "--graph" in sys.argv:
        for parent, g in sorted(graphs.items()):
            for a in sorted(g):
                print("%s: %s -> %s" % ("::".join(("crate",) + parent), a, ", ".join(sorted(g[a]))))
    for f in failures:
        print("layering: " + f)
    if failures:
        sys.exit(1)
    print("layering: %d modules, %d import arrows, no cycle, order kept" % (len(modules), len(edges)))


def declared_orders():
    """`Import order` lines of docs/DESIGN.md: `- `crate::attack`: a, b, c`."""
    orders = {}
    with open(os.path.join(ROOT, "docs", "DESIGN.md")) as fh:
        text = fh.read()
    m = re.search(r"^Import order[^\n]*\n((?:[-*] [^\n]*\n(?:  [^\n]*\n)*)+)", text, re.M)
    if not m:
        return orders
    for item in re.split(r"\n(?=[-*] )", m.group(1).strip()):
        head, _, body = item[2:].partition(": ")
        parent = tuple(p for p in head.strip().strip("`").split("::") if p != "crate")
        names = [n.strip().strip("`.") for n in body.replace("\n", " ").split(",")]
        orders[parent] = [n for n in names if n]
    return orders


def sccs(g):
    nodes = set(g) | {b for outs in g.values() for b in outs}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
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
            out.append(comp)

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()
