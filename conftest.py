"""Shared test helpers: the scripts run as a user runs them, in a scratch folder, offline."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(REPO, '..', 'shared')  # test data beside the checkout; the product never reads it
SHAKESPEARE = os.path.join(SHARED, 'data', 'tinyshakespeare.txt')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken_cache')

if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)  # GPT-2's BPE without a download


@pytest.fixture
def shakespeare_txt():
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"needs the real Tiny Shakespeare at {SHAKESPEARE}")
    return SHAKESPEARE


@pytest.fixture
def gpt2_offline():
    if not os.path.isdir(TIKTOKEN_CACHE):
        pytest.skip(f"needs tiktoken's r50k_base cached in {TIKTOKEN_CACHE} (there is no network here)")


def run_script(script, *args, cwd, expect_ok=True, timeout=300, torchrun=0):
    """Run one of the repo's scripts with a fresh Python in folder cwd; returns the CompletedProcess."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}']
    env = {**os.environ, 'OMP_NUM_THREADS': '1' if torchrun else os.environ.get('OMP_NUM_THREADS', '2')}
    result = subprocess.run([*launcher, os.path.join(REPO, script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
