"""An invalid topology file is refused with exit status 2 and a message that names the file,
the child and the field, before anything is spawned."""

import pytest


def good(tree, name):
    return {"name": name, "command": tree.probe(name)}


# (id, topology maker, words the message must contain besides the file name)
CASES = [
    ("duplicate names",
     lambda t: {"children": [good(t, "db"), good(t, "db")]},
     ["db", "name", "duplicate"]),
    ("bad strategy",
     lambda t: {"children": [good(t, "ok"),
                             {"name": "sub", "type": "supervisor", "strategy": "one_for_none",
                              "children": [good(t, "leaf")]}]},
     ["sub", "strategy", "one_for_none"]),
    ("significant with permanent",
     lambda t: {"children": [good(t, "ok"), {**good(t, "db"), "restart": "permanent",
                                               "significant": True}]},
     ["db", "significant"]),
    ("negative shutdown",
     lambda t: {"children": [good(t, "ok"), {**good(t, "db"), "shutdown": -5}]},
     ["db", "shutdown"]),
    ("missing command",
     lambda t: {"children": [good(t, "ok"), {"name": "db"}]},
     ["db", "command"]),
    ("unknown key",
     lambda t: {"children": [good(t, "ok"), {**good(t, "db"), "restrat": "transient"}]},
     ["db", "restrat"]),
    ("bad restart value",
     lambda t: {"children": [good(t, "ok"), {**good(t, "db"), "restart": "sometimes"}]},
     ["db", "restart", "sometimes"]),
]


@pytest.mark.parametrize("make,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_topology_exits_2_naming_file_child_and_field_and_spawns_nothing(tree, make, words):
    path = tree.write_topology(make(tree))
    status = tree.run_to_exit(None, timeout=5)
    err = tree.stderr()
    assert status == 2, tree.diagnostics()
    assert str(path) in err, f"message does not name the file:\n{err}"
    for word in words:
        assert word in err, f"message does not contain '{word}':\n{err}"
    assert tree.events() == [], "a child was spawned from an invalid topology"


def test_a_topology_file_that_is_not_toml_exits_2_naming_the_file(tree):
    path = tree.write_topology("children = [ this is not toml")
    assert tree.run_to_exit(None, timeout=5) == 2
    assert str(path) in tree.stderr()


def test_a_missing_topology_file_exits_2_naming_the_file(tree):
    tree.topology_path = tree.dir / "does-not-exist.toml"
    assert tree.run_to_exit(None, timeout=5) == 2
    assert "does-not-exist.toml" in tree.stderr()
