"""
Validate a GPU in one command, in about 6 minutes on an H100 or H200 from a cold Triton cache:

    python gpu_check.py                  # logs and SUMMARY.txt in $OUT, or gpu_check_out/
    python gpu_check.py --dry_run=True   # on any machine: how many kernels each step would compile

Every step is a process of its own under its own timeout; the test steps run side by side (what
takes their time is compiling kernels, one CPU core each), then the benchmark, on the compile cache
they warmed. SUMMARY.txt names every failure with its first error line, every time-out with the
test it was in, and what each step compiled; then the benchmark's tables.
  configs_bf16  test_gpu.py: every autotune configuration of the three Triton kernels forced once
  configs_fp16  against float64, at head dims 64 and 128, grouped-query attention included
  configs_fp32
  gpu_tests     the rest of test_gpu.py: the sdpa path's CUDA branches, decode steps, tuning once
                per length bucket, train.py eager against torch.compile
  fsdp          train.py under FSDP2 with torch.compile and bf16, a world of one, saved and resumed
  kernel_float32  test_kernel.py on the GPU: every implementation against float64 over many shapes,
  kernel_variants grouped-query attention, sink logits, pseudo lengths, extreme decays,
  kernel_suite  and the rest (bf16 included, torch.compile fullgraph)
  model_suite   test_model.py on the GPU (attn_impl='auto' as there: the sdpa path, the Triton kernel for ALiBi)
  bench         bench.py --quick: attention forward+backward at T = 2k, 4k, 8k, head dim 128, bf16,
                against SDPA's flash and cuDNN kernels; the 160M model, StableMask against causal
The correctness steps autotune by taking the first configuration that fits (each configuration is
proven in the configs_* steps); the benchmark times them all. A step's compile budget is what its
timeout allows at --seconds_per_compile; test_bench.py holds every step to it with --dry_run, which
runs the steps' tests with the kernels replaced by a logger of what they would compile.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from configurator import configure_script

# -----------------------------------------------------------------------------
out_dir = ''  # where logs and SUMMARY.txt go; empty: $OUT if set, else gpu_check_out
steps = 'all'  # the steps to run, comma-separated, or all
jobs = 0  # test steps run at once; 0: all of them (one GPU takes them together; each compiles on a core of its own)
dry_run = False  # no GPU needed: run each step's tests with the kernels only logged, and count what they would compile
seconds_per_compile = 3.0  # what a compile takes (Triton 3.6, one core of a GPU server), for the budgets
require_gpu = True  # False runs the steps anyway (on a CPU the GPU tests skip: a check of this script)
# -----------------------------------------------------------------------------
if __name__ == '__main__':  # imported (test_bench.py does), it keeps its defaults
    configure_script(globals(), sys.argv[1:], rules=dict(jobs='>=0', seconds_per_compile='>0'))
REPO = os.path.dirname(os.path.abspath(__file__))
PYTEST = [sys.executable, '-m', 'pytest', '-v', '-rfE', '-p', 'no:cacheprovider', '--durations=5']
VARIANTS = 'grouped_query or sink_logit or pseudo_len or extreme_gamma'
# name: (command, timeout in seconds, most compiles allowed or None where torch.compile's own dominate, autotuning)
STEPS = {
    'configs_bf16': (PYTEST + ['test_gpu.py', '-k', 'every_autotune_config and bfloat16'], 170, 55, 'full'),
    'configs_fp16': (PYTEST + ['test_gpu.py', '-k', 'every_autotune_config and float16 and not bfloat16'], 170, 55, 'full'),
    'configs_fp32': (PYTEST + ['test_gpu.py', '-k', 'every_autotune_config and float32'], 170, 55, 'full'),
    'gpu_tests': (PYTEST + ['test_gpu.py', '-k', 'not every_autotune_config and not fsdp'], 170, None, 'first'),
    'fsdp': (PYTEST + ['test_gpu.py', '-k', 'fsdp'], 170, None, 'first'),
    'kernel_float32': (PYTEST + ['test_kernel.py', '-k', 'float32_matches'], 170, 55, 'first'),
    'kernel_variants': (PYTEST + ['test_kernel.py', '-k', VARIANTS], 170, 55, 'first'),
    'kernel_suite': (PYTEST + ['test_kernel.py', '-k', f'not float32_matches and not ({VARIANTS})'], 170, 55, 'first'),
    'model_suite': (PYTEST + ['test_model.py'], 170, 55, 'first'),
    'bench': ([sys.executable, 'bench.py', '--quick'], 190, None, 'full'),
}
LAST = ('bench',)  # after the others: on a warm compile cache, alone on the GPU


def run_step(name, log_path, launch_log, dry):
    """Start one step: (its process, the moment it started). Its output goes to log_path, and each
    kernel launch to launch_log."""
    command, timeout, budget, autotune = STEPS[name]
    env = {**os.environ, 'STABLEMASK_AUTOTUNE': autotune, 'STABLEMASK_LAUNCH_LOG': launch_log}
    if dry:  # only the kernels' tests matter to the count; the others would run for real on the CPU
        env['STABLEMASK_DRY_RUN'] = '1'
        command = command + ['-k', 'not sdpa and not reference'] if '-k' not in command else \
            command[:-1] + [f"({command[-1]}) and not sdpa and not reference"]
    log = open(log_path, 'w')
    proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return proc, time.time()


def compiles(launch_log):
    """How many kernels a GPU compiles for the launches a step logged (stablemask_kernel.log_launch):
    where the autotuner meets a new key it compiles every config it times, at that launch's
    specialisation; afterwards only the config it chose, at each new specialisation. (Which it
    chooses is the GPU's to say: the first is counted.)"""
    if not os.path.exists(launch_log):
        return 0
    chosen, compiled = {}, set()
    with open(launch_log) as f:
        for record in (json.loads(line) for line in f if line.strip()):
            tune = record['kernel'], json.dumps(record['tune']), json.dumps(record['configs'])  # other candidates: a tuning of its own
            spec = json.dumps(record['spec'])
            configs = record['configs'] if tune not in chosen else [chosen[tune]]
            chosen.setdefault(tune, record['configs'][0])
            compiled.update((record['kernel'], spec, json.dumps(c)) for c in configs)
    return len(compiled)


def report(name, result, seconds, log_path, count):
    """The step's lines for SUMMARY.txt: its result, what it compiled, each failure with its first
    error line, the test a time-out stopped, or the benchmark's tables."""
    budget = STEPS[name][2]
    head = f"{name}: {result} in {seconds:.0f} s ({os.path.basename(log_path)}); {count} kernels compiled" + \
        (f" (budget {budget})" if budget else '')
    with open(log_path, errors='replace') as f:
        lines = f.read().splitlines()
    if name == 'bench':
        return [head] + [f"    {line}" for line in lines if line.startswith('|') or 'error' in line.lower()]
    outcomes = [m.group(2) for line in lines if (m := re.match(r'(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)', line))]
    body = [f"    {outcomes.count('PASSED')} passed, {outcomes.count('FAILED') + outcomes.count('ERROR')} failed, "
            f"{outcomes.count('SKIPPED')} skipped"]
    body += [f"    {line}" for line in lines if line.startswith(('FAILED ', 'ERROR '))]  # -rfE: the test and its first error line
    if result.startswith('TIMEOUT'):
        started = [line.split()[0] for line in lines if re.match(r'\S+::\S+', line)]
        if started:
            body.append(f"    stopped in or after {started[-1]}")
    if not result.startswith(('PASS', 'TIMEOUT')) and not any(line.startswith(('FAILED ', 'ERROR ')) for line in lines):
        body += [f"    {line}" for line in lines[-8:]]  # no test results: how it ended (an import error, say)
    return [head] + body


def main():
    import torch
    if require_gpu and not dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: error: no CUDA GPU here (--dry_run=True counts the compiles without one; "
                 "--require_gpu=False runs the steps anyway)")
    chosen = list(STEPS) if steps == 'all' else steps.split(',')
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        sys.exit(f"gpu_check.py: error: unknown step {unknown[0]!r}; steps are {', '.join(STEPS)}")
    folder = out_dir or os.environ.get('OUT') or 'gpu_check_out'
    os.makedirs(folder, exist_ok=True)
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    summary = [f"{device}, torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}"
               + (' (dry run: kernels logged, not run)' if dry_run else ''), '']
    if importlib.util.find_spec('pytest') is None:
        summary += ["pytest is not installed (pip install pytest): the test steps did not run", '']
        chosen = [s for s in chosen if s in LAST]
    if dry_run:
        chosen = [s for s in chosen if STEPS[s][2] is not None]  # the steps whose compiles are counted
    waves = [[s for s in chosen if s not in LAST], [s for s in chosen if s in LAST]]
    failed = False
    for wave in waves:
        pending, running = list(wave), {}
        while pending or running:
            while pending and (not jobs or len(running) < jobs):
                name = pending.pop(0)
                logs = os.path.join(folder, f"{name}.log"), os.path.join(tempfile.mkdtemp(), 'launches.jsonl')
                print(f"gpu_check: {name} (at most {STEPS[name][1]} s) ...", flush=True)
                running[name] = (*run_step(name, *logs, dry_run), *logs)
            time.sleep(0.5)
            for name, (proc, started, log_path, launch_log) in list(running.items()):
                seconds = time.time() - started
                if proc.poll() is None and seconds < STEPS[name][1]:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    result = f"TIMEOUT after {STEPS[name][1]} s"
                else:
                    result = 'PASS' if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
                count = compiles(launch_log)
                budget = STEPS[name][2]
                if dry_run:
                    result = 'within budget' if count <= budget else 'OVER BUDGET'
                failed |= result not in ('PASS', 'within budget') or (budget is not None and count > budget)
                lines = report(name, result, seconds, log_path, count)
                summary += [*lines, '']
                print(lines[0], flush=True)
                del running[name]
    with open(os.path.join(folder, 'SUMMARY.txt'), 'w') as f:
        f.write('\n'.join(summary) + '\n')
    print(f"gpu_check: {'FAILED' if failed else 'all passed'}; {os.path.join(folder, 'SUMMARY.txt')}")
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
