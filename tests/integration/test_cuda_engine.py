"""`vsup run --engine cuda` on a machine without a GPU (CI's): the engine is built (nvcc was
found), so the flags are accepted and the tree starts; the rank, the only process that loads the
CUDA module, finds no device and fails the start at once with "no CUDA device: ..." naming the
cause, the run exits with the start-failure status (3) and leaves nothing behind. At TP 2 the
same, after engine-core has made the ranks' NCCL id (which needs no GPU). --dtype, and the KV
connector (which cannot read a GPU cache), are checked against the engine before anything
starts.

On a machine with a GPU these cases skip: tests/gpu/run.sh checks that machine's serving.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from test_cli_validation import run_refused
from test_cpu_engine import session_processes, trees  # noqa: F401  (the fixture)

START_FAILURE = 3


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0


def cuda_built(vsup_bin: str) -> bool:
    # The engine is checked before the size: a build without it says so, one with it refuses
    # the size.
    probe = subprocess.run([vsup_bin, "run", "--engine", "cuda", "--kv-cache-memory", "lots"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode == 2, probe.stderr
    return "built without it" not in probe.stderr


@pytest.fixture
def cuda_build(vsup_bin):
    if not cuda_built(vsup_bin):
        pytest.skip("SKIPPED: this vsup was built without the CUDA engine (no nvcc at setup)")


@pytest.fixture
def no_gpu_cuda_build(cuda_build):
    if has_gpu():
        pytest.skip("SKIPPED: this machine has a GPU; tests/gpu/run.sh checks serving on it")


@pytest.mark.parametrize("tp", [1, 2])
def test_without_a_gpu_the_cuda_engine_fails_its_start_at_once_naming_the_cause(
        trees, tmp_path, no_gpu_cuda_build, tp):
    # run_to_exit also waits (2 s at most) for every process of the run to be gone.
    code, err, took = trees.run_to_exit("--engine", "cuda", "--model", "vsup-tiny-4m",
                                        "--kv-cache-memory", "32MiB",
                                        "--tensor-parallel-size", str(tp))
    assert code == START_FAILURE, err
    assert "no CUDA device: cudaGetDeviceCount: " in err, err
    # The cause, in words: CI has the toolkit but no driver.
    assert "no NVIDIA driver" in err or "sees no usable GPU" in err or "sees no GPU" in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vsup run: start failed: no CUDA device: "), err
    assert re.search(r"engine-core: worker-tp\d stopped in .* \(code 3\)", err), err
    assert took < 20, f"the failed start took {took:.1f}s"
    for sid in trees.sids:
        assert not session_processes(sid), session_processes(sid)
    assert not list(tmp_path.glob("run-*/ctl.sock")), "the control socket was left behind"


def test_dtype_is_checked_against_the_engine_before_anything_starts(vsup_bin, tmp_path):
    cpu = ("--engine", "cpu", "--model", "vsup-tiny-4m", "--kv-cache-memory", "32MiB")
    text = run_refused(vsup_bin, tmp_path, "--dtype", "bfloat16", engine=cpu)
    assert "--dtype 'bfloat16': the cpu engine computes in float32" in text, text
    text = run_refused(vsup_bin, tmp_path, "--dtype", "fp8", engine=cpu)
    assert "--dtype" in text and "fp8" in text, text


def test_the_kv_connector_is_refused_with_the_cuda_engine_before_anything_starts(
        vsup_bin, tmp_path, cuda_build):
    cuda = ("--engine", "cuda", "--model", "vsup-tiny-4m", "--kv-cache-memory", "32MiB")
    text = run_refused(vsup_bin, tmp_path, "--kv-connector", "vsup", engine=cuda)
    assert "--kv-connector vsup needs an engine whose KV cache can be transferred" in text, text
    assert "not --engine cuda" in text, text
