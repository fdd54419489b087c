"""Children's stdout and stderr are collected by their supervisor: every line attributed to the
process that wrote it, once, on the same stream, and nothing lost (not even a last line without
a newline)."""

import re
import signal

from conftest import wait_for


def test_child_output_is_prefixed_with_its_name_and_pid_on_the_same_stream_and_never_lost(tree):
    script = ("echo out-line; echo err-line >&2; "
              "trap 'echo bye; printf last-words-without-newline; exit 0' TERM; "
              "while :; do sleep 1 & wait $!; done")
    tree.start({"children": [
        {"name": "talker", "command": ["sh", "-c", script]},
        {"name": "sub", "type": "supervisor", "children": [
            {"name": "leaf", "command": ["sh", "-c", "echo leaf-line; exec sleep 100"]},
        ]},
    ]})
    tree.wait_log(r"\[supervisor\] root: all 2 children ready")
    # Ready (readiness "none") is not "has run its first echo": under load a SIGTERM could beat
    # the shells to their first lines, which would then never have been written at all.
    wait_for(lambda: tree.stdout_path.exists() and "leaf-line" in tree.stdout_path.read_text()
             and "out-line" in tree.stdout_path.read_text(), 10, "the children's first lines",
             tree.diagnostics)
    tree.signal(signal.SIGTERM)
    assert tree.wait_exit() == 0
    out = tree.stdout_path.read_text()
    err = tree.stderr()
    pid = int(re.search(r"started talker \(pid (\d+)\)", err).group(1))
    assert f"(talker pid={pid}) out-line\n" in out
    assert f"(talker pid={pid}) err-line\n" in err, "stderr must stay on stderr"
    assert "err-line" not in out
    assert f"(talker pid={pid}) bye\n" in out
    assert f"(talker pid={pid}) last-words-without-newline\n" in out, "a last partial line was lost"
    # The sub-supervisor attributes its leaf; the root passes the line through unchanged.
    leaf = [line for line in out.splitlines() if "leaf-line" in line]
    assert len(leaf) == 1 and re.fullmatch(r"\(leaf pid=\d+\) leaf-line", leaf[0]), leaf
