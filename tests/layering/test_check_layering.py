"""Tests of tools/check_layering.py (the layering check), on small fake trees in tmp_path.

Run: python3 -m pytest -q tests/layering   (or `meson test -C build layering-selftest`).
"""

import importlib.util
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "tools" / "check_layering.py"

_spec = importlib.util.spec_from_file_location("check_layering", SCRIPT)
check_layering = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layering)

# A small tree that obeys every rule: each layer includes what it may.
LEGAL_TREE = {
    "base/clock.h": "#pragma once\n#include <chrono>\n",
    "base/log.cpp": '#include "base/clock.h"\n#include <cstdio>\n',
    "ipc/node.capnp": "@0xdeadbeefdeadbeef;\n",   # generates ipc/node.capnp.h
    "ipc/uv_kj.h": '#pragma once\n#include <kj/async.h>\n#include <uv.h>\n#include "base/clock.h"\n',
    "ipc/rpc_link.cpp": '#include "ipc/uv_kj.h"\n#include "ipc/node.capnp.h"\n#include <capnp/rpc.h>\n',
    "supervisor/supervisor.cpp": '#include "ipc/uv_kj.h"\n#include "ipc/node.capnp.h"\n'
                                 '#include "base/log.h"\n#include "supervisor/spec.h"\n',
    "supervisor/public/supervisor.h": '#include "supervisor/spec.h"\n',
    "kernels/cpu_kernels.h": '#include "base/check.h"\n',
    "engine/engine.h": '#include "base/error.h"\n#include "engine/types.h"\n',
    "engine/cpu_engine.cpp": '#include "engine/cpu_engine.h"\n#include "kernels/cpu_kernels.h"\n'
                             '#include "engine/core/scheduler.h"\n',
    "engine/core/scheduler.h": '#include "engine/core/kv_block_manager.h"\n#include "engine/engine.h"\n'
                               '#include "engine/types.h"\n#include "engine/text_stream.h"\n'
                               '#include "engine/tokenizer.h"\n#include "engine/config.h"\n'
                               '#include "kernels/cpu_kernels.h"\n#include "base/clock.h"\n',
    "engine/gpu.cu": '#include "kernels/cpu_kernels.h"\n',
    "kvconnector/kv_connector.h": '#include "base/clock.h"\n#include "engine/engine.h"\n',
    "workers/worker_main.cpp": '#include "supervisor/supervisor.h"\n#include "ipc/uv_kj.h"\n'
                               '#include "engine/cpu_engine.h"\n#include "kvconnector/kv_connector.h"\n'
                               '#include <kj/async.h>\n#include <uv.h>\n',
    "workers/http/http_server.h": '#include "workers/processes.h"\n#include "llhttp.h"\n',
    "tools/main.cpp": '#include "workers/processes.h"\n#include "supervisor/supervisor.h"\n',
    # tests/, bench/, examples/ may include anything: not checked.
    "tests/probe.cpp": '#include "workers/processes.h"\n#include <kj/async.h>\n',
    "bench/b.cpp": '#include "tools/commands.h"\n',
    "examples/e.cpp": '#include "workers/public/llm.h"\n',
    # Not sources: not scanned.
    "engine/meson.build": '#include "supervisor/supervisor.h"\n',
    "engine/notes.txt": '#include "supervisor/supervisor.h"\n',
}


def make_tree(root, files):
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def run_check(root, *extra):
    """Runs the script as CI does; returns (exit status, stdout lines, stderr)."""
    cp = subprocess.run([sys.executable, str(SCRIPT), *extra, str(root)],
                        capture_output=True, text=True)
    return cp.returncode, cp.stdout.splitlines(), cp.stderr


def violations_of(root):
    return check_layering.Checker(str(root)).run()


def with_file(tmp_path, rel, text):
    files = dict(LEGAL_TREE)
    files[rel] = text
    return make_tree(tmp_path, files)


def test_legal_tree_passes(tmp_path):
    make_tree(tmp_path, LEGAL_TREE)
    rc, out, err = run_check(tmp_path)
    assert rc == 0, out
    assert len(out) == 1 and out[0].startswith("check_layering: 0 violation(s)"), out
    assert violations_of(tmp_path) == []


def test_engine_including_supervisor_fails(tmp_path):
    with_file(tmp_path, "engine/sim_engine.cpp",
              '#include "engine/engine.h"\n\n#include "supervisor/supervisor.h"\n')
    rc, out, _ = run_check(tmp_path)
    assert rc == 1
    assert out[0] == ('engine/sim_engine.cpp:3: engine must not include "supervisor/supervisor.h"'
                      ' (engine may include: base, kernels)')
    assert out[-1].startswith("check_layering: 1 violation(s)")


def test_kvconnector_including_ipc_fails(tmp_path):
    with_file(tmp_path, "kvconnector/sim_connector.cpp",
              '#include "kvconnector/kv_connector.h"\n#include "ipc/node.capnp.h"\n'
              '#include "ipc/uv_kj.h"\n')
    assert [(p, l) for p, l, _ in violations_of(tmp_path)] == [
        ("kvconnector/sim_connector.cpp", 2), ("kvconnector/sim_connector.cpp", 3)]
    rc, out, _ = run_check(tmp_path)
    assert rc == 1
    assert 'kvconnector must not include "ipc/uv_kj.h" (kvconnector may include: base, engine)' \
        in out[1]


def test_engine_core_including_backend_fails(tmp_path):
    with_file(tmp_path, "engine/core/model_runner.h",
              '#include "engine/engine.h"\n#include "engine/cpu_engine.h"\n')
    rc, out, _ = run_check(tmp_path)
    assert rc == 1
    assert out[0].startswith(
        'engine/core/model_runner.h:2: engine/core must not include "engine/cpu_engine.h"')
    assert len(out) == 2


@pytest.mark.parametrize("backend", ["engine/sim_engine.h", "engine/llama_model.h",
                                     "engine/weights.h", "engine/collective.h", "engine/blas.h",
                                     "engine/registry.h"])
def test_engine_core_other_backends_fail(tmp_path, backend):
    with_file(tmp_path, "engine/core/x.cpp", '#include "%s"\n' % backend)
    assert len(violations_of(tmp_path)) == 1


def test_engine_including_kj_fails(tmp_path):
    with_file(tmp_path, "engine/engine_loop.cpp",
              '#include "engine/engine.h"\n#include <vector>\n#include <kj/async.h>\n')
    rc, out, _ = run_check(tmp_path)
    assert rc == 1
    assert out[0].startswith("engine/engine_loop.cpp:3: engine must not include <kj/async.h>")


@pytest.mark.parametrize("rel,header", [("base/fd.h", "uv.h"), ("kernels/k.cu", "capnp/message.h"),
                                        ("engine/core/s.h", "kj/common.h")])
def test_capnp_and_uv_forbidden_in_foundation(tmp_path, rel, header):
    with_file(tmp_path, rel, "#include <%s>\n" % header)
    v = violations_of(tmp_path)
    assert len(v) == 1 and v[0][0] == rel and ("<%s>" % header) in v[0][2]


@pytest.mark.parametrize("rel,header", [
    ("base/log.h", "ipc/uv_kj.h"),              # base includes nothing of ours
    ("base/log.h", "kernels/cpu_kernels.h"),
    ("ipc/x.h", "supervisor/supervisor.h"),     # upward
    ("kernels/k.h", "engine/engine.h"),         # upward
    ("engine/e.h", "ipc/node.capnp.h"),         # generated capnp headers count as ipc
    ("engine/e.h", "workers/processes.h"),
    ("supervisor/s.h", "engine/engine.h"),      # unrelated
    ("supervisor/s.h", "kernels/cpu_kernels.h"),
    ("kvconnector/k.h", "kernels/cpu_kernels.h"),
    ("workers/w.h", "tools/commands.h"),        # upward
    ("workers/w.h", "tests/util.h"),            # tests are not a layer anyone may use
    ("engine/e.h", "../supervisor/supervisor.h"),   # relative spellings are resolved
])
def test_forbidden_includes(tmp_path, rel, header):
    files = dict(LEGAL_TREE)
    files[rel] = '#include "%s"\n' % header
    files["supervisor/supervisor.h"] = "#pragma once\n"
    make_tree(tmp_path, files)
    v = violations_of(tmp_path)
    assert len(v) == 1, v
    assert v[0][:2] == (rel, 1)


def test_relative_include_within_layer_passes(tmp_path):
    files = dict(LEGAL_TREE)
    files["ipc/uv_handle.h"] = "#pragma once\n"
    files["ipc/rpc.h"] = '#include "uv_handle.h"\n#include "node.capnp.h"\n'
    make_tree(tmp_path, files)
    assert violations_of(tmp_path) == []


def test_commented_out_includes_ignored(tmp_path):
    with_file(tmp_path, "engine/c.cpp",
              '// #include "supervisor/supervisor.h"\n/*\n#include "ipc/uv_kj.h"\n*/\n'
              '#include "base/clock.h"  // not "ipc/uv_kj.h"\n')
    assert violations_of(tmp_path) == []


def test_every_violation_reported(tmp_path):
    with_file(tmp_path, "engine/bad.cpp",
              '#include "supervisor/a.h"\n#include "ipc/b.h"\n#include <uv.h>\n')
    rc, out, _ = run_check(tmp_path)
    assert rc == 1
    assert [line.split(":")[1] for line in out[:-1]] == ["1", "2", "3"]
    assert out[-1].startswith("check_layering: 3 violation(s)")


def test_usage_errors_exit_2(tmp_path):
    rc, _, err = run_check(tmp_path / "missing")
    assert rc == 2 and "not a directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_check(tmp_path / "empty")
    assert rc == 2 and "no layer folder" in err
    rc, _, _ = run_check(tmp_path, "--no-such-flag")
    assert rc == 2


def test_table_is_one_place():
    layers = check_layering.RULES["layers"]
    # lowest first: every layer uses only layers listed before it
    names = list(layers)
    for i, name in enumerate(names):
        assert set(layers[name]) <= set(names[:i]), name
    assert layers["kvconnector"] == ["base", "engine"]
    assert "docs/architecture.md" in SCRIPT.read_text()
