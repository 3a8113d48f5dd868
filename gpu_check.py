"""
Validate a GPU in one command, in about 8 minutes on an H100 or H200:

    python gpu_check.py                  # logs and SUMMARY.txt in $OUT, or gpu_check_out/

Each step runs in a process of its own under its own timeout, and SUMMARY.txt lists what each
found, then the benchmark's tables:
  gpu_tests     test_gpu.py: every Triton autotune configuration forced once against float64 (bf16,
                fp16, fp32), the sdpa path's flash and memory-efficient branches and decode steps,
                tuning once per length bucket, train.py eager against torch.compile
  suite         test_kernel.py and test_model.py on the GPU (torch.compile fullgraph included)
  bench         bench.py --quick: attention forward+backward at T = 2k, 4k, 8k, head dim 128, bf16,
                against SDPA's flash and cuDNN kernels; the 160M model's training tokens/s and MFU,
                StableMask against causal
"""

import os
import subprocess
import sys
import time

from configurator import configure_script

# -----------------------------------------------------------------------------
out_dir = ''  # where logs and SUMMARY.txt go; empty: $OUT if set, else gpu_check_out
steps = 'gpu_tests,suite,bench'  # which steps to run, in order
test_timeout = 240  # seconds for each test step
bench_timeout = 200  # seconds for the benchmark
require_gpu = True  # False runs the steps anyway (on a CPU the GPU tests skip: a check of this script)
# -----------------------------------------------------------------------------
configure_script(globals(), sys.argv[1:], rules=dict(test_timeout='>0', bench_timeout='>0'))
REPO = os.path.dirname(os.path.abspath(__file__))
PYTEST = [sys.executable, '-m', 'pytest', '-q', '-rfEs', '-p', 'no:cacheprovider', '--durations=5']
STEPS = {'gpu_tests': (PYTEST + ['test_gpu.py'], test_timeout),
         'suite': (PYTEST + ['test_kernel.py', 'test_model.py'], test_timeout),
         'bench': ([sys.executable, 'bench.py', '--quick'], bench_timeout)}


def run_step(name, command, timeout, log_path):
    """(result word, seconds, the output's last lines) of one step, its whole output in log_path."""
    start = time.time()
    with open(log_path, 'w') as log:
        try:
            code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
            result = 'PASS' if code == 0 else f'FAIL (exit {code})'
        except subprocess.TimeoutExpired:
            result = f'TIMEOUT after {timeout} s'
    with open(log_path) as log:
        lines = log.read().splitlines()
    tail = [line for line in lines if line.startswith('|')] if name == 'bench' else lines[-12:]
    return result, time.time() - start, tail


def main():
    import torch
    if require_gpu and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU here (--require_gpu=False runs the steps anyway)")
    unknown = [s for s in steps.split(',') if s not in STEPS]
    if unknown:
        sys.exit(f"gpu_check.py: error: unknown step {unknown[0]!r}; steps are {', '.join(STEPS)}")
    folder = out_dir or os.environ.get('OUT') or 'gpu_check_out'
    os.makedirs(folder, exist_ok=True)
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    summary = [f"{device}, torch {torch.__version__}, triton {triton.__version__}", '']
    failed = False
    for name in steps.split(','):
        command, timeout = STEPS[name]
        print(f"gpu_check: {name} (at most {timeout} s) ...", flush=True)
        result, seconds, tail = run_step(name, command, timeout, os.path.join(folder, f"{name}.log"))
        failed |= result != 'PASS'
        summary += [f"{name}: {result} in {seconds:.0f} s ({name}.log)", *(f"    {line}" for line in tail), '']
        print(summary[-len(tail) - 2], flush=True)
    with open(os.path.join(folder, 'SUMMARY.txt'), 'w') as f:
        f.write('\n'.join(summary))
    print(f"gpu_check: {'FAILED' if failed else 'all passed'}; {os.path.join(folder, 'SUMMARY.txt')}")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
