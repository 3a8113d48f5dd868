"""Shared test helpers: the scripts run as a user runs them, in a scratch folder, offline."""

import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.abspath(__file__))
SHAKESPEARE = os.path.join(REPO, 'testdata', 'shakespeare_excerpt.txt')  # the first 40 kB of Tiny Shakespeare
TIKTOKEN_CACHE = os.path.join(REPO, '..', 'shared', 'tiktoken_cache')  # beside the checkout on the project's machines

if os.environ.get('STABLEMASK_DRY_RUN') == '1':  # gpu_check.py --dry_run: count what the GPU run compiles
    import model
    model.AUTO_IMPL['cpu'] = 'triton'  # attn_impl='auto' takes the kernel there

if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)  # GPT-2's BPE without a download


@pytest.fixture
def shakespeare_txt():
    return SHAKESPEARE


@pytest.fixture(scope='session')
def gpt2_offline():
    """GPT-2's BPE from tiktoken's cache, or downloaded once; a test that needs it skips only without both."""
    import tiktoken
    try:
        tiktoken.get_encoding('r50k_base')
    except Exception as e:  # tiktoken raises whatever its download raised
        pytest.skip(f"needs a network, or tiktoken's r50k_base in TIKTOKEN_CACHE_DIR ({type(e).__name__})")


@pytest.fixture
def poisoned():
    """Every tensor made by torch.empty / empty_like starts as NaN (PyTorch's own filling of
    uninitialised memory, under deterministic mode), so an element a kernel forgets to write shows
    in the comparison instead of passing by chance as stale memory."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # warn_only: nondeterministic GPU kernels still run
    assert torch.empty(1).isnan().all() and torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


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
