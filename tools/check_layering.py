#!/usr/bin/env python3
"""Layering check: fail when a source file includes a header of a higher or unrelated layer.

Usage: tools/check_layering.py [-v] [REPO_ROOT]

REPO_ROOT defaults to this script's parent's parent (the repository root). Scans the
.h/.cpp/.c++/.cu/.cuh files under each layer folder of RULES below, and checks:
  * quoted includes (#include "x/y.h") against the layer table;
  * <capnp/...>, <kj/...> and <uv.h> in the layers that must stay free of Cap'n Proto and
    libuv (all other <...> includes are ignored).
A quoted include is resolved from the repository root when its first component is a folder
of the repository (or a layer), else relative to the including file; one that resolves to
nothing in the tree (an external or generated header) is skipped and counted.

Prints every violation as `path:line: <layer> must not include "<header>" (...)`, then a
one-line summary. Exit status: 0 clean, 1 on any violation, 2 on a usage error.
Python 3 standard library only.
"""

import argparse
import os
import re
import sys

# ---------------------------------------------------------------------------------------------
# THE LAYER TABLE. This is the one place the rules live; the same table is documented in
# docs/architecture.md ("Layering") -- change both together.
# Layers, lowest first. A file may include headers of its own layer and of the layers listed
# as its "may_include"; never a higher or unrelated one. Folders not listed here and not in
# "unchecked" are unrelated to every layer.
RULES = {
    "layers": {
        "base":        [],
        "ipc":         ["base"],
        "supervisor":  ["base", "ipc"],
        "kernels":     ["base"],
        "engine":      ["base", "kernels"],            # includes engine/core/ (see below)
        "kvconnector": ["base", "engine"],
        "workers":     ["base", "ipc", "supervisor", "kernels", "engine", "kvconnector"],
        "tools":       ["base", "ipc", "supervisor", "kernels", "engine", "kvconnector",
                        "workers"],
    },
    # May include anything; never scanned.
    "unchecked": ["tests", "bench", "examples"],
    # engine/core/ is part of engine but backend-agnostic: of engine/ outside engine/core/ it
    # may include only these headers (not cpu_engine.h, sim_engine.h, llama_*.h, weights.h,
    # collective.h, blas.h, registry.h, ...). Everything else of engine/core/ is free.
    "engine_core": {
        "folder": "engine/core",
        "may_include_of_engine": ["engine/engine.h", "engine/types.h", "engine/text_stream.h",
                                  "engine/tokenizer.h", "engine/config.h", "engine/stats.h"],
    },
    # System includes forbidden in these layers (no Cap'n Proto, no libuv): prefixes of the
    # <...> name, or whole names.
    "no_capnp_uv": {
        "layers": ["base", "kernels", "engine"],
        "system_prefixes": ["capnp/", "kj/"],
        "system_names": ["uv.h"],
    },
}
# ---------------------------------------------------------------------------------------------

SOURCE_SUFFIXES = (".h", ".cpp", ".c++", ".cu", ".cuh")

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*(?:"([^"]+)"|<([^>]+)>)')


def _strip_comments(text):
    """Blank out // and /* */ comments (keeping line numbers), so commented-out includes
    are not checked. String literals with comment markers are rare enough in #include lines
    to ignore."""
    out = []
    i, n = 0, len(text)
    while i < n:
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join("\n" if c == "\n" else " " for c in text[i:j]))
            i = j
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            i = j
        elif text[i] == '"':
            # skip a string literal, so an include's "a//b.h" or a "/*" in a string survives
            j = i + 1
            while j < n and text[j] not in '"\n':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class Checker:
    def __init__(self, root):
        self.root = os.path.abspath(root)
        self.layers = RULES["layers"]
        self.unchecked = set(RULES["unchecked"])
        core = RULES["engine_core"]
        self.core_folder = core["folder"]
        self.core_engine_ok = set(core["may_include_of_engine"])
        nocu = RULES["no_capnp_uv"]
        self.nocu_layers = set(nocu["layers"])
        self.nocu_prefixes = tuple(nocu["system_prefixes"])
        self.nocu_names = set(nocu["system_names"])
        self.violations = []   # (relpath, line, message)
        self.skipped = []      # (relpath, line, header): quoted includes resolved to nothing
        self.files_scanned = 0

    # -- classification ----------------------------------------------------------------------

    def layer_of(self, relpath):
        """The layer (top-level folder) a repository-relative path belongs to, or its top
        folder if that is not a layer ('' for a file at the root)."""
        parts = relpath.split("/")
        return parts[0] if len(parts) > 1 else ""

    def in_core(self, relpath):
        return relpath.startswith(self.core_folder + "/")

    def _exists(self, relpath):
        p = os.path.join(self.root, relpath)
        if os.path.isfile(p):
            return True
        # generated Cap'n Proto header: x.capnp.h comes from x.capnp
        return relpath.endswith(".capnp.h") and os.path.isfile(p[:-2])

    def resolve(self, includer, header):
        """Repository-relative path of a quoted include, or None if external."""
        first = header.split("/")[0]
        if "/" in header and (first in self.layers or first in self.unchecked
                              or os.path.isdir(os.path.join(self.root, first))):
            return os.path.normpath(header).replace(os.sep, "/")
        rel = os.path.normpath(os.path.join(os.path.dirname(includer), header))
        rel = rel.replace(os.sep, "/")
        if not rel.startswith("../") and self._exists(rel):
            return rel
        return None

    def allowed_text(self, layer, core):
        if core:
            ok = [x for x in self.layers["engine"]] + [self.core_folder + "/*"]
            ok += sorted(self.core_engine_ok)
            return "engine/core may include: " + ", ".join(ok)
        ok = self.layers[layer]
        return "%s may include: %s" % (layer, ", ".join(ok) if ok else "nothing of ours")

    # -- checking ----------------------------------------------------------------------------

    def check_include(self, relpath, lineno, header):
        layer = self.layer_of(relpath)
        core = self.in_core(relpath)
        target = self.resolve(relpath, header)
        if target is None:
            self.skipped.append((relpath, lineno, header))
            return
        tlayer = self.layer_of(target)
        ok = tlayer == layer or tlayer in self.layers[layer]
        if ok and core and tlayer == "engine" and not self.in_core(target):
            ok = target in self.core_engine_ok
        if not ok:
            who = self.core_folder if core else layer
            self.violations.append((relpath, lineno, '%s must not include "%s" (%s)'
                                    % (who, header, self.allowed_text(layer, core))))

    def check_system_include(self, relpath, lineno, header):
        layer = self.layer_of(relpath)
        if layer not in self.nocu_layers:
            return
        if header.startswith(self.nocu_prefixes) or header in self.nocu_names:
            who = self.core_folder if self.in_core(relpath) else layer
            self.violations.append((relpath, lineno,
                                    "%s must not include <%s> (%s has no Cap'n Proto or libuv)"
                                    % (who, header, who)))

    def check_file(self, relpath):
        self.files_scanned += 1
        with open(os.path.join(self.root, relpath), encoding="utf-8", errors="replace") as f:
            text = _strip_comments(f.read())
        for lineno, line in enumerate(text.split("\n"), 1):
            m = _INCLUDE_RE.match(line)
            if not m:
                continue
            if m.group(1) is not None:
                self.check_include(relpath, lineno, m.group(1).strip())
            else:
                self.check_system_include(relpath, lineno, m.group(2).strip())

    def run(self):
        for layer in self.layers:
            top = os.path.join(self.root, layer)
            if not os.path.isdir(top):
                continue
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames.sort()
                for name in sorted(filenames):
                    if name.endswith(SOURCE_SUFFIXES):
                        rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                        self.check_file(rel.replace(os.sep, "/"))
        return self.violations


def main(argv=None):
    default_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(
        description="Fail when a file includes a header of a higher layer "
                    "(table: docs/architecture.md, \"Layering\").")
    ap.add_argument("root", nargs="?", default=default_root,
                    help="repository root (default: %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also list quoted includes that resolved to nothing in the tree")
    args = ap.parse_args(argv)   # exits 2 on a usage error

    if not os.path.isdir(args.root):
        print("check_layering: %s: not a directory" % args.root, file=sys.stderr)
        return 2
    if not any(os.path.isdir(os.path.join(args.root, l)) for l in RULES["layers"]):
        print("check_layering: %s: no layer folder (%s) found; is it the repository root?"
              % (args.root, ", ".join(RULES["layers"])), file=sys.stderr)
        return 2

    checker = Checker(args.root)
    violations = checker.run()
    for path, line, msg in violations:
        print("%s:%d: %s" % (path, line, msg))
    if args.verbose:
        for path, line, header in checker.skipped:
            print('%s:%d: note: "%s" resolves to nothing in the tree; not checked'
                  % (path, line, header))
    print("check_layering: %d violation(s) in %d file(s) scanned%s"
          % (len(violations), checker.files_scanned,
             ", %d external include(s) skipped" % len(checker.skipped)
             if checker.skipped else ""))
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
