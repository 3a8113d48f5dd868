"""bench.py runs (on a CPU: the sdpa path, the reference and causal SDPA), and its FlexAttention
StableMask, a comparison on GPUs, computes StableMask."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench import flex_stablemask
from conftest import HANG_GUARD, REPO, kill_group, run_command, run_script
from model import alibi_slopes, stablemask_reference


def test_quick_bench_prints_both_tables(tmp_path):
    """Every row is measured (or says why not: a backend this GPU lacks, out of memory, a reference too
    big to materialise), and the ratios are taken against the first implementation of each length, the
    causal baseline. A small workload (one length, a tiny model): behaviour, not speed."""
    gpu = torch.cuda.is_available()
    size = ['--tokens=4096', '--model_preset=tiny', '--length=512'] if gpu else ['--length=128']
    out = run_script('bench.py', '--quick', '--reps=1', '--decode=False', *size, cwd=tmp_path).stdout
    rows = [line for line in out.splitlines() if re.match(r'\| \d+ \|', line)]
    attention = [r for r in rows if r.count('|') == 10]
    model = [r for r in rows if r.count('|') == 7]
    expected = ['SDPA causal', 'sdpa StableMask (ours)', 'reference StableMask']
    if gpu:
        expected = ['SDPA causal, flash', 'Triton StableMask (ours)', 'sdpa StableMask (ours)',
                    'Triton StableMask, dQ by its own kernel (ours)']
    assert len(attention) >= 4 and len(model) >= 3, out
    for name in expected:
        assert any(name in r for r in attention)
    for row in attention + model:
        cells = [c.strip() for c in row.strip('|').split('|')]
        if cells[2].startswith(('failed', 'out of memory', 'skipped')):
            assert not cells[2].endswith(':'), row  # the reason, not only its type
            continue
        assert all(cells[i] and cells[i] != 'nan' for i in range(len(cells) - 1)), row
    length = lambda row: row.split('|')[1]
    first_of_each_length = [r for i, r in enumerate(attention)
                            if i == 0 or length(r) != length(attention[i - 1])]
    assert all('SDPA causal' in r and r.split('|')[8].strip() == '1.00' for r in first_of_each_length)


@pytest.mark.filterwarnings('ignore:.*flex_attention called without torch.compile')
def test_flex_stablemask_forward_matches_the_reference(monkeypatch):
    """FlexAttention's backward needs a GPU; its forward runs (eagerly) here. Its block mask is built
    once per length, not inside every timed call."""
    import torch.nn.attention.flex_attention as flex
    built = []
    make = flex.create_block_mask
    monkeypatch.setattr(flex, 'create_block_mask', lambda *a, **kw: built.append(a[3]) or make(*a, **kw))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=g) for _ in range(3))
    gamma = alibi_slopes(3)
    attend = flex_stablemask(gamma)
    out = attend(q, k, v)
    ref = stablemask_reference(q.double(), k.double(), v.double(), gamma.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    torch.testing.assert_close(attend(q, k, v), out)
    assert built == [37]


def test_flex_is_compiled_once_per_shape(monkeypatch):
    """dynamo stops recompiling a function after 8 shapes and runs it eagerly (materialising T x T):
    bench.py resets it whenever the shape changes, so each shape gets its own compile."""
    import bench
    compiled, resets = [], []
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compiled.append(kw) or fn)
    monkeypatch.setattr(torch._dynamo, 'reset', lambda: resets.append(1))
    monkeypatch.setattr(bench, '_flex', {})
    shapes = [((4, 16, T, 128), torch.bfloat16) for T in (512, 1024, 2048)] * 2
    shapes += [((4, 16, 512, 64), torch.float16)]
    for shape in shapes:
        for _ in range(4):  # forward, backward, both, memory: one shape, one compile
            bench._compiled_flex(shape)
    assert len(compiled) == len(resets) == 7 and all(kw == dict(dynamic=False) for kw in compiled)


def test_gpu_check_runs_its_steps_and_writes_a_summary(tmp_path):
    """gpu_check.py's plumbing, on a CPU: a step runs in its own process (here the GPU tests, which
    skip), its log goes to log_dir, and SUMMARY.txt, alone in out_dir, says what it found, test by test,
    and is printed whole at the end. Without a GPU it refuses unless told otherwise."""
    result = run_script('gpu_check.py', f'--out_dir={tmp_path}', cwd=tmp_path, expect_ok=False)
    if not torch.cuda.is_available():
        assert result.returncode == 1 and result.stderr.count('\n') == 1
        assert 'no CUDA GPU here' in result.stderr
    out, logs = tmp_path / 'out', tmp_path / 'logs'
    result = run_script('gpu_check.py', '--require_gpu=False', '--steps=gpu_tests', f'--out_dir={out}',
                        f'--log_dir={logs}', cwd=tmp_path)
    summary = (out / 'SUMMARY.txt').read_text()
    assert 'gpu_tests: PASS' in summary and re.search(r'\d+ passed, 0 failed, \d+ skipped', summary), summary
    assert result.stdout.endswith(summary) and summary.rstrip().endswith('gpu_check: all 1 steps passed')
    assert sorted(p.name for p in out.iterdir()) == ['SUMMARY.txt']
    # -v: each test named
    assert 'test_gpu.py::test_decode_steps_on_the_gpu' in (logs / 'gpu_tests.log').read_text()


STEPS_UNDER_TEST = "def test_fails():\n    assert 1 == 2, 'one is not two'\ndef test_passes():\n    pass\n"
# a step that hangs in a test as pytest -v shows it, after starting a child of its own
HANGS = r"""
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
with open(os.environ['CHILD_PID'], 'w') as f:
    f.write(str(child.pid))
print('test_steps.py::test_hangs ', flush=True)
time.sleep(600)
"""


def ended(pid):
    """Whether process pid has ended (or is a zombie), waiting up to a minute for it to."""
    for _ in range(600):
        try:
            with open(f'/proc/{pid}/stat') as f:
                if f.read().rpartition(')')[2].split()[0] == 'Z':
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize('dry_run', [False, True])
def test_gpu_check_reports_failures_and_time_outs(tmp_path, monkeypatch, capsys, dry_run):
    """A failing test is named with its first error line; a step past its time-out is stopped with
    everything it started (its process group) and named with the test it was in; the other steps
    still run; the failures come last in SUMMARY.txt, which is printed whole at the end, and the
    failing steps' log tails go to failures.log, beside it; the exit status is 1. A dry run too."""
    import gpu_check
    (tmp_path / 'test_steps.py').write_text(STEPS_UNDER_TEST)
    monkeypatch.setenv('CHILD_PID', str(tmp_path / 'child.pid'))
    monkeypatch.setattr(gpu_check, 'REPO', str(tmp_path))
    monkeypatch.setattr(gpu_check, 'STEPS', {
        'failing': (gpu_check.PYTEST + ['test_steps.py', '-k', 'fails or passes'], 120, 0, 'first', 0),
        'hanging': ([sys.executable, '-c', HANGS], 10, 0, 'first', 0),
        'passing': (gpu_check.PYTEST + ['test_steps.py', '-k', 'passes'], 120, 0, 'first', 0)})
    for name, value in dict(out_dir=str(tmp_path / 'out'), log_dir=str(tmp_path / 'logs'), require_gpu=False,
                            dry_run=dry_run).items():
        monkeypatch.setattr(gpu_check, name, value)
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main()
    assert stopped.value.code == 1
    summary = (tmp_path / 'out' / 'SUMMARY.txt').read_text()
    assert capsys.readouterr().out.endswith(summary)
    assert 'failing: FAIL (exit 1)' in summary and '1 passed, 1 failed' in summary
    assert 'FAILED test_steps.py::test_fails - AssertionError: one is not two' in summary
    assert 'hanging: TIMEOUT after 10 s' in summary
    assert 'stopped in or after test_steps.py::test_hangs' in summary
    assert summary.index('passing: PASS') < min(summary.index('failing: FAIL'), summary.index('hanging:'))
    assert summary.rstrip().splitlines()[-1].endswith('rerun them with --steps=failing,hanging')
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['SUMMARY.txt', 'failures.log']
    tails = (tmp_path / 'out' / 'failures.log').read_text()
    assert 'one is not two' in tails and '===== hanging: TIMEOUT' in tails and 'passing' not in tails
    assert ended(int((tmp_path / 'child.pid').read_text()))  # killed with its step


def test_gpu_check_ctrl_c_stops_its_steps_and_sums_up(tmp_path):
    """Ctrl-C while a step runs: the step's process group is stopped, what finished is summed up in
    SUMMARY.txt with the steps not finished named for a rerun, and the exit status is 130."""
    out = tmp_path / 'out'
    command = [sys.executable, os.path.join(REPO, 'gpu_check.py'), '--require_gpu=False',
               '--steps=kernel_gqa', f'--out_dir={out}', f'--log_dir={tmp_path / "logs"}']
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().startswith('gpu_check: kernel_gqa (at most')  # the step has started
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_GUARD) == 130
    finally:
        kill_group(proc)
    summary = (out / 'SUMMARY.txt').read_text()
    assert 'interrupted (Ctrl-C): kernel_gqa not finished' in summary
    assert summary.rstrip().endswith('not finished: kernel_gqa; rerun them with --steps=kernel_gqa')
    running = [line for line in os.popen('ps -eo args')
               if 'test_kernel.py' in line and str(tmp_path) in line]
    assert not running


@pytest.mark.slow
def test_a_subprocess_past_its_time_out_is_stopped_with_its_children(tmp_path):
    """conftest.run_command (under run_script and the tests' own subprocesses) kills the whole process
    group at the time-out: a child the command started ends with it."""
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, '-c', HANGS], cwd=tmp_path, timeout=10,
                    env={**os.environ, 'CHILD_PID': str(tmp_path / 'child.pid')})
    assert ended(int((tmp_path / 'child.pid').read_text()))


@pytest.mark.slow
def test_gpu_check_compiles_within_its_budget(tmp_path):
    """--dry_run runs every step on the CPU, the Triton kernels replaced by a logger (and PyTorch for
    their results), and counts what a GPU would compile (the autotuner simulated: every configuration
    it times at a new key, then its choice at each new specialisation): every step passes, each within
    its budget, which leaves 40% of its time-out free; the test steps' time-outs and then the
    benchmark's fit in 7 minutes. The counts are real: a forced-configuration step compiles at least
    every configuration of its dtype and head dim; the benchmark's plan keeps dQ by atomics against dQ
    by its own kernel at T = 8192, and no reference there."""
    import gpu_check
    import kernel_configs
    tests = [name for name in gpu_check.STEPS if name not in gpu_check.LAST]
    last = sum(gpu_check.STEPS[n][1] for n in gpu_check.LAST)
    assert max(gpu_check.STEPS[n][1] for n in tests) + last + 20 <= 7 * 60  # 20 s: gpu_check's own start
    for name, (command, timeout, other, autotune, inductor) in gpu_check.STEPS.items():
        allowed = gpu_check.budget(name) * gpu_check.seconds_per_compile + other + \
            inductor * gpu_check.inductor_seconds / gpu_check.compile_threads
        assert gpu_check.budget(name) > 0 and allowed <= (1 - 0.4) * timeout, name
    logs = tmp_path / 'logs'
    # two steps at a time, and time-outs of an hour: a slow machine is not a failure here
    result = run_script('gpu_check.py', '--dry_run=True', f'--out_dir={tmp_path}', f'--log_dir={logs}',
                        '--jobs=2', '--timeout_scale=20', cwd=tmp_path, expect_ok=False)
    summary = (tmp_path / 'SUMMARY.txt').read_text()
    assert result.returncode == 0, summary
    counts = {name: (int(n), int(most)) for name, n, most in
              re.findall(r'^(\w+): PASS in .*?; (\d+) kernels compiled \(budget (\d+)\)', summary, re.M)}
    assert set(counts) == set(gpu_check.STEPS), summary
    assert all(n <= most == gpu_check.budget(name) for name, (n, most) in counts.items()), counts
    for name in counts:
        if name.startswith('configs_') and name != 'configs_bf16_d80_fp32':
            width = 128 if name.endswith('d128') else 64
            every = sum(len(choices) for (_, bits, D), choices in kernel_configs.CONFIGS.items()
                        if (bits, D) == (16, width))
            assert counts[name][0] >= every, (name, counts[name], every)
    assert counts['kernel_bf16_suite'][0] > 10 and counts['model_suite'][0] > 3
    assert counts['gpu_tests'][0] > 3  # its tests of the model's layout and of the deterministic mode
    tables = (tmp_path / 'bench.md').read_text()
    for row in ('Triton StableMask (ours)', 'Triton StableMask, dQ by its own kernel (ours)'):
        assert f'| 8192 | {row} |' in tables, tables
    assert 'reference' not in tables and 'Decoding' not in tables and counts['bench'][0] > 10
