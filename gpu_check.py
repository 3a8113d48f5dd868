"""
Validate a GPU in one command, in at most 6.5 minutes from a cold start on an H100 or H200 (the test
steps side by side, then the benchmark: their time-outs), so that a 15-minute lease has room to rerun
the steps that failed (--steps=a,b):

    python gpu_check.py                  # SUMMARY.txt, failures.log and bench.md in $OUT, or gpu_check_out/
    python gpu_check.py --dry_run=True   # on any machine: what each step would compile, against its budget

Every step is a process of its own, in a process group of its own, under its own time-out: at the
time-out the whole group is killed (train.py runs, Inductor's compile workers), and so is whatever a
step leaves running. The test steps run side by side (what takes their time is compiling kernels, one
CPU core each), then the benchmark, on the compile cache they warmed. At the end SUMMARY.txt is
printed in full, its most important part last: the benchmark's tables, each step's result and what
it compiled, then every failure with its first error line and every time-out with the test it was
in. $OUT holds three files at most (SUMMARY.txt; failures.log, the failing steps' last log lines;
bench.md, the tables); each step's full log goes to log_dir. Ctrl-C stops the steps and still writes
the summary (exit status 130); its last line names the steps to rerun.
  configs_*     test_gpu.py: every autotune configuration of the three Triton kernels forced once
                against float64 (bf16, fp16, fp32), head dims 64 and 128, grouped-query attention
  gpu_tests     the rest of test_gpu.py: the sdpa path's CUDA branches (cuDNN on Hopper: the model's
                own q, k, v layout, a decode step, PyTorch's own cuDNN attention beside ours, the
                deterministic mode), decode steps, tuning once per length bucket
  train_compiled  train.py eager against torch.compile (Inductor)
  fsdp          train.py under FSDP2 with torch.compile and bf16, a world of one, saved and resumed,
                its losses against the same run unsharded in float32
  kernel_*      test_kernel.py on the GPU: every implementation against float64 over many shapes,
                grouped-query attention, sink logits, pseudo lengths, extreme decays, the forward's
                float32 copy of O only for a backward, low precision against PyTorch's own
                (FlashAttention's criterion), and the rest (torch.compile fullgraph)
  model_suite   test_model.py on the GPU (attn_impl='auto' as there: the sdpa path, the Triton kernel
                for ALiBi)
  bench         bench.py --quick: attention forward+backward at T = 8192, head dim 128, bf16, against
                SDPA's flash and cuDNN kernels, dQ by atomics against dQ by its own kernel; the 160M
                model, StableMask against causal
The correctness steps autotune by taking the first configuration that fits (each configuration is
proven in the configs_* steps); the benchmark times them all. What a step compiles is what takes its
time, so each has a budget: the kernels that 60% of its time-out holds at --seconds_per_compile
after its other work (start-up, references, training runs, Inductor's kernels on their workers).
Each step's tests (conftest.py) and the benchmark log every launch of our kernels (instrument(),
which wraps the kernel file's launch): what a GPU compiles is counted from them. --dry_run runs
every step on the CPU with the Triton kernels only logged (their results computed by PyTorch: this
file is loaded into each step's pytest as a plugin) and counts what a GPU would compile (the
autotuner simulated); a failure, a time-out or a count over budget fails it, as on a GPU.
Inductor's kernels are counted on a GPU (each step's own Inductor cache, against its allowance); a dry
run cannot see them, and the budgets assume the allowances.
"""

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from configurator import configure_script

# -----------------------------------------------------------------------------
out_dir = ''  # where SUMMARY.txt, failures.log and bench.md go; empty: $OUT if set, else gpu_check_out
log_dir = ''  # where each step's full log goes; empty: a new temporary folder (named in SUMMARY.txt)
steps = 'all'  # the steps to run, comma-separated, or all
jobs = 0  # test steps run at once; 0: all of them (one GPU takes them together; each compiles on a core)
dry_run = False  # no GPU needed: run each step with the kernels only logged; count what they would compile
seconds_per_compile = 3.0  # one of our kernels' compile (Triton 3.6, a core of a GPU server): the budgets
inductor_seconds = 1.0  # one of Inductor's kernels' compile (small fused kernels), on one of its workers
compile_threads = 2  # Inductor's compile workers per process (TORCHINDUCTOR_COMPILE_THREADS)
timeout_scale = 1.0  # every step's time-out times this (a dry run on a slow CPU needs more; budgets keep 1)
require_gpu = True  # False runs the steps anyway (on a CPU the GPU tests skip: a check of this script)
# -----------------------------------------------------------------------------
# imported (test_bench.py does, and pytest, as a dry run's plugin), it keeps its defaults
if __name__ == '__main__':
    configure_script(globals(), sys.argv[1:], rules=dict(jobs='>=0', seconds_per_compile='>0',
                                                         inductor_seconds='>0', compile_threads='>0',
                                                         timeout_scale='>0'))
REPO = os.path.dirname(os.path.abspath(__file__))
PYTEST = [sys.executable, '-m', 'pytest', '-v', '-rfE', '-p', 'no:cacheprovider', '--durations=5']
HEADROOM = 0.4  # the part of every time-out that a step's estimate leaves free
CONFIGS = 'every_autotune_config'  # test_gpu.py's forced configurations
NOT_BF16 = 'not bfloat16'
VARIANTS = 'grouped_query or sink_logit or pseudo_len or extreme_gamma or float32_output'
REST = (f'not float32_matches and not low_precision and not ({VARIANTS}) and not both_ways_of_dq '
        'and not autotuning_once')


def tests(file, chosen=None, timeout=180, other=20, autotune='first', inductor=0):
    """A test step: pytest -v on the tests of `file` that -k `chosen` selects (None: all); its time-out,
    the seconds of its work other than compiling our kernels, its autotuning, and the Inductor
    kernels it may compile."""
    return PYTEST + [file] + (['-k', chosen] if chosen else []), timeout, other, autotune, inductor


# name: (command, time-out in seconds, seconds of work other than compiling our kernels, autotuning,
# Inductor's kernels allowed); the test steps, then the benchmark
STEPS = {
    'configs_bf16_d128': tests('test_gpu.py', f'{CONFIGS} and bfloat16-T257', autotune='full'),
    'configs_bf16_d64': tests('test_gpu.py', f'{CONFIGS} and bfloat16-T300', autotune='full'),
    'configs_bf16_d80_fp32': tests('test_gpu.py', f'{CONFIGS} and (bfloat16-T33 or float32)',
                                   autotune='full'),
    'configs_fp16_d128': tests('test_gpu.py', f'{CONFIGS} and float16-T200 and {NOT_BF16}', autotune='full'),
    'configs_fp16_d64': tests('test_gpu.py', f'{CONFIGS} and float16-T1- and {NOT_BF16}', autotune='full'),
    'gpu_tests': tests('test_gpu.py', f'not {CONFIGS} and not train_on_the_gpu and not fsdp', other=30),
    'train_compiled': tests('test_gpu.py', 'train_on_the_gpu', other=50, inductor=80),
    'fsdp': tests('test_gpu.py', 'fsdp', other=60, inductor=80),
    'kernel_float32_a': tests('test_kernel.py', 'float32_matches and (slopes or zero)'),
    'kernel_float32_b': tests('test_kernel.py', 'float32_matches and not (slopes or zero)'),
    'kernel_gqa': tests('test_kernel.py', 'grouped_query'),
    'kernel_variants': tests('test_kernel.py',
                             'sink_logit or pseudo_len or extreme_gamma or float32_output'),
    'kernel_fp16': tests('test_kernel.py', 'low_precision and not bf16'),
    'kernel_bf16_suite': tests('test_kernel.py', f'(low_precision_within_3x and bf16) or ({REST})'),
    'kernel_dq': tests('test_kernel.py', 'both_ways_of_dq'),
    'kernel_tuning': tests('test_kernel.py', 'autotuning_once'),
    'model_suite': tests('test_model.py', other=40),
    'bench': ([sys.executable, 'bench.py', '--quick'], 200, 45, 'full', 0),
}
LAST = ('bench',)  # after the others: on a warm compile cache, alone on the GPU


def budget(name):
    """The most of our kernels step `name` may compile: what (1 - HEADROOM) of its time-out holds at
    seconds_per_compile after its other work and Inductor's allowance (on compile_threads workers)."""
    command, timeout, other, autotune, inductor = STEPS[name]
    return math.floor(((1 - HEADROOM) * timeout - other - inductor * inductor_seconds / compile_threads)
                      / seconds_per_compile)


def limit(name):
    """Step `name`'s time-out here, in seconds."""
    return STEPS[name][1] * timeout_scale


def run_step(name, folder, dry):
    """Start one step in a process group of its own: (its process, the moment it started, its log,
    its launch log, its Inductor cache). Its output goes to the log, each kernel launch to the
    launch log, and Inductor's kernels to a cache of its own (cold, so they are counted)."""
    command, timeout, other, autotune, inductor = STEPS[name]
    log_path, launch_log, cache = (os.path.join(folder, name + end)
                                   for end in ('.log', '.launches.jsonl', '.inductor'))
    env = {**os.environ, 'STABLEMASK_AUTOTUNE': autotune, 'STABLEMASK_LAUNCH_LOG': launch_log,
           'TORCHINDUCTOR_COMPILE_THREADS': str(compile_threads), 'TORCHINDUCTOR_CACHE_DIR': cache}
    if os.path.exists(launch_log):  # an earlier run's, in the same log_dir: counted afresh
        os.remove(launch_log)
    shutil.rmtree(cache, ignore_errors=True)
    if dry:
        env['STABLEMASK_DRY_RUN'] = '1'
    if dry and command[:2] == PYTEST[:2]:
        # this file as pytest's plugin (emulate()), and the kernels' tests only: the others run for real
        here = os.path.dirname(os.path.abspath(__file__))
        env['PYTHONPATH'] = os.pathsep.join(filter(None, [env.get('PYTHONPATH'), here]))
        k = command.index('-k') if '-k' in command else len(command)
        chosen = f"({command[k + 1]}) and " if k < len(command) else ''
        chosen += 'not sdpa and not reference'
        command = command[:k] + ['-p', 'gpu_check', '-k', chosen] + command[k + 2:]
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    return proc, time.time(), log_path, launch_log, cache


def stop(proc):
    """SIGKILL to the step's whole process group (whatever it left running too), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # nothing of it is left
        pass
    proc.wait()


def compiles(launch_log):
    """How many kernels a GPU compiles for the launches a step logged (log_launch):
    where the autotuner meets a new key it compiles every config it times, at that launch's
    specialisation; afterwards only the config it chose, at each new specialisation. (Which it
    chooses is the GPU's to say: the first is counted.)"""
    if not os.path.exists(launch_log):
        return 0
    chosen, compiled = {}, set()
    with open(launch_log) as f:
        for record in (json.loads(line) for line in f if line.strip()):
            # other candidates: a tuning of its own
            tune = record['kernel'], json.dumps(record['tune']), json.dumps(record['configs'])
            spec = json.dumps(record['spec'])
            configs = record['configs'] if tune not in chosen else [chosen[tune]]
            chosen.setdefault(tune, record['configs'][0])
            compiled.update((record['kernel'], spec, json.dumps(c)) for c in configs)
    return len(compiled)


def inductor_kernels(cache):
    """How many Triton kernels Inductor generated into a step's cache: a file of source each (the
    modules that call them hold their source too, and are not counted)."""
    count = 0
    for root, _, files in os.walk(cache):
        for name in files:
            if name.endswith('.py'):
                with open(os.path.join(root, name), errors='replace') as f:
                    text = f.read()
                count += '@triton.jit' in text and 'async_compile' not in text
    return count


def report(name, result, seconds, log_path, ours, theirs):
    """(the step's lines for SUMMARY.txt, whether it belongs with the failures): its result, what it
    compiled against its budget, each failure with its first error line, the test a time-out
    stopped, how a step without test results ended."""
    allowed = STEPS[name][4]
    over = ours > budget(name) or theirs > allowed
    head = f"{name}: {result} in {seconds:.0f} s; {ours} kernels compiled (budget {budget(name)})" + \
        (f", {theirs} by Inductor (allowed {allowed})" if allowed else '') + (' OVER BUDGET' if over else '')
    with open(log_path, errors='replace') as f:
        lines = f.read().splitlines()
    if name in LAST:
        body = [f"    {line}" for line in lines if re.search(r'error|Traceback', line, re.I)][-10:]
    else:
        outcome = re.compile(r'\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR)')
        outcomes = [m.group(1) for line in lines if (m := outcome.match(line))]
        failed = outcomes.count('FAILED') + outcomes.count('ERROR')
        passed, skipped = outcomes.count('PASSED'), outcomes.count('SKIPPED')
        body = [f"    {passed} passed, {failed} failed, {skipped} skipped"]
        # -rfE: each failing test with its first error line
        body += [f"    {line}" for line in lines if line.startswith(('FAILED ', 'ERROR '))]
        if result.startswith('TIMEOUT'):
            started = [line.split()[0] for line in lines if re.match(r'\S+::\S+', line)]
            body.append(f"    stopped in or after {started[-1]}" if started else "    stopped before a test")
    named = any(line.startswith(('FAILED ', 'ERROR ')) for line in lines)
    if result not in ('PASS', 'TIMEOUT') and not named:
        # no test results: how it ended (an import error, say)
        body += [f"    {line}" for line in lines[-8:]]
    return [head] + body, result != 'PASS' or over


def tables(log_path):
    """The benchmark's markdown: its headings and table rows, a blank line between tables."""
    with open(log_path, errors='replace') as f:
        lines = [line for line in f.read().splitlines() if line.startswith(('#', '|'))]
    return [line if not line.startswith('#') else f"\n{line}\n" for line in lines]


def environment():
    import torch
    import triton
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'
    cudnn = f", cuDNN {torch.backends.cudnn.version()}" if torch.cuda.is_available() else ''
    python = sys.version.split()[0]
    return f"{device}, torch {torch.__version__}, triton {triton.__version__}{cudnn}, Python {python}"


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
    logs = log_dir or tempfile.mkdtemp(prefix='gpu_check-')
    os.makedirs(folder, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    notes = [environment() + (' (dry run: kernels logged, not run)' if dry_run else '') + f"; logs: {logs}"]
    if importlib.util.find_spec('pytest') is None:
        notes.append("pytest is not installed (pip install pytest): the test steps did not run")
        chosen = [s for s in chosen if s in LAST]
    finished, unfinished = run_steps(chosen, logs)
    if unfinished is not None:
        notes.append(f"interrupted (Ctrl-C): {', '.join(unfinished)} not finished")
    write_results(folder, logs, notes, finished, unfinished or [])
    sys.exit(130 if unfinished is not None else 1 if any(failed for _, failed in finished.values()) else 0)


def run_steps(chosen, logs):
    """Run the chosen steps, the test steps side by side (at most `jobs` at once), then the benchmark.
    Returns ({step: report()'s answer}, the steps a Ctrl-C left unfinished, or None without one)."""
    finished, running, interrupted = {}, {}, []
    # Ctrl-C: the steps are stopped and what finished is summed up
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        for wave in ([s for s in chosen if s not in LAST], [s for s in chosen if s in LAST]):
            pending = list(wave)
            while (pending or running) and not interrupted:
                while pending and (not jobs or len(running) < jobs):
                    name = pending.pop(0)
                    running[name] = run_step(name, logs, dry_run)
                    print(f"gpu_check: {name} (at most {limit(name):.0f} s) ...", flush=True)
                time.sleep(0.5)
                for name, (proc, started, log_path, launch_log, cache) in list(running.items()):
                    seconds = time.time() - started
                    if proc.poll() is None and seconds < limit(name):
                        continue
                    code = proc.poll()
                    result = 'PASS' if code == 0 else f"FAIL (exit {code})" if code is not None else \
                        f"TIMEOUT after {limit(name):.0f} s"
                    stop(proc)
                    del running[name]
                    counts = compiles(launch_log), inductor_kernels(cache)
                    finished[name] = report(name, result, seconds, log_path, *counts)
                    print(finished[name][0][0], flush=True)
    finally:  # no step outlives this process
        for proc, *_ in running.values():
            stop(proc)
    return finished, [s for s in chosen if s not in finished] if interrupted else None


def write_results(folder, logs, notes, finished, unfinished):
    """SUMMARY.txt (then printed whole), failures.log (each failing step's last log lines) and bench.md
    into folder; the last line names the steps to rerun: those that failed, and those not finished."""
    failing = [name for name in STEPS if name in finished and finished[name][1]]
    where = os.path.join(folder, 'failures.log')
    for stale in (where, os.path.join(folder, 'bench.md')):  # an earlier run's, in the same folder
        if os.path.exists(stale):
            os.remove(stale)
    summary = notes + ['']
    if 'bench' in finished:
        markdown = tables(os.path.join(logs, 'bench.log'))
        write(os.path.join(folder, 'bench.md'), markdown)
        summary += markdown + ['']
    # the failures last, nearest the end of the output
    for name in [n for n in STEPS if n in finished and n not in failing] + failing:
        summary += finished[name][0] + ['']
    if failing:
        tails = []
        for name in failing:
            with open(os.path.join(logs, f"{name}.log"), errors='replace') as f:
                tails += [f"===== {finished[name][0][0]}", *f.read()[-20000:].splitlines()[-150:], '']
        write(where, tails)
    problems = [f"FAILED: {', '.join(failing)} (their logs' ends in {where})"] if failing else []
    problems += [f"not finished: {', '.join(unfinished)}"] if unfinished else []
    rerun = ','.join(failing + unfinished)
    verdict = f"gpu_check: {'; '.join(problems)}; rerun them with --steps={rerun}" if problems else \
        f"gpu_check: all {len(finished)} steps passed"
    write(os.path.join(folder, 'SUMMARY.txt'), summary + [verdict])
    print('\n' + '\n'.join(summary + [verdict]), flush=True)


def write(path, lines):
    """lines into path, whole or not at all (a temporary file, then renamed)."""
    with open(f"{path}.tmp", 'w') as f:
        f.write('\n'.join(lines) + '\n')
    os.replace(f"{path}.tmp", path)


# -----------------------------------------------------------------------------
# the kernels' launches in each step's processes: logged to STABLEMASK_LAUNCH_LOG, to count what they
# compile; in a dry run (STABLEMASK_DRY_RUN=1) only logged, and in its tests their results emulated


def instrument(kernel_module):
    """Log every launch of kernel_module's kernels to STABLEMASK_LAUNCH_LOG, and under
    STABLEMASK_DRY_RUN=1 launch nothing. It wraps kernel_module._launch, through which every kernel
    launches. conftest.py calls this in a step's tests, bench.py in the benchmark."""
    import kernel_configs
    launch, log = kernel_module._launch, os.environ['STABLEMASK_LAUNCH_LOG']
    dry = os.environ.get('STABLEMASK_DRY_RUN') == '1'

    def logged(name, grid_blocks, BH, T, *args, **kwargs):
        if name == 'preprocess':  # not autotuned: its caller gives its block
            configs = [[kwargs['BLOCK_M']]]
        else:
            q = kernel_configs.base_tensor(args[0])
            tried = kernel_configs.candidates(name, q, kwargs['HEAD_DIM'], kwargs.get('ATOMIC_DQ', False))
            configs = [kernel_configs.config_tuple(c) for c in tried]
        log_launch(log, name, kernel_module._kernels[name].arg_names, args, kwargs, configs)
        if not dry:
            launch(name, grid_blocks, BH, T, *args, **kwargs)
    kernel_module._launch = logged


def log_launch(path, name, arg_names, args, constexprs, configs):
    """One line of the launch log: the kernel, what Triton compiles it for (the constexprs, each
    tensor's dtype and 16-byte alignment, each integer's being 1 or a multiple of 16), the values
    the autotuner keys on, and the configs it would time there."""
    import torch
    import kernel_configs
    spec = []
    for value in args:
        if isinstance(value, torch.Tensor):
            spec.append(f"{value.dtype}:{value.data_ptr() % 16 == 0}")
        elif kernel_configs.base_tensor(value) is not value:
            # a tensor descriptor: specialised on its dtype (and its config's tiles)
            spec.append(f"desc:{value.base.dtype}")
        elif isinstance(value, int):
            spec.append(f"i:{value == 1}:{value % 16 == 0}")
        else:
            spec.append(type(value).__name__)
    constants = sorted(f"{k}={v}" for k, v in constexprs.items())
    # the autotuner keys on its keys and on every tensor's dtype
    keys = kernel_configs.TUNE_KEYS.get(name, constexprs)
    tuned = sorted(f"{k}={v}" for k, v in constexprs.items() if k in keys)
    dtypes = [str(value.dtype) for value in args if isinstance(value, torch.Tensor)]
    bucket = dict(zip(arg_names, args)).get('T_BUCKET')
    record = dict(kernel=name, spec=spec + constants, tune=[bucket, *tuned, *dtypes], configs=configs)
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def pytest_configure(config):
    """A dry run's tests load this file as a plugin (-p gpu_check): the kernels, only logged there,
    get their results from PyTorch (emulate), so that the tests' assertions hold."""
    if os.environ.get('STABLEMASK_DRY_RUN') == '1':
        import stablemask_kernel as sk
        launch = sk._launch

        def logged_and_emulated(name, grid_blocks, BH, T, *args, **kwargs):
            launch(name, grid_blocks, BH, T, *args, **kwargs)
            emulate(name, args, kwargs)
        sk._launch = logged_and_emulated


def emulate(name, args, kwargs):
    """What kernel `name` of stablemask_kernel writes, for the launch (args, kwargs), written with
    PyTorch in float64: the forward's O (and its float32 copy) and base-2 log-sum-exp; the
    preprocess kernel's Delta; dK/dV's shares (each query head's), and with ATOMIC_DQ dQ's sums; the
    dQ kernel's dQ."""
    import torch
    import kernel_configs
    import stablemask_kernel as sk
    from stablemask_sdpa import log_pseudo_mass
    a = {**dict(zip(sk._kernels[name].arg_names, map(kernel_configs.base_tensor, args))), **kwargs}
    if name == 'preprocess':
        B, H, T, _ = a['O'].shape
        a['Delta'].copy_((a['O'].double() * a['DO'].double()).sum(-1).view(B * H, T))
        return
    q, k, v = (a[n].double() for n in 'QKV')
    k, v = (t.repeat_interleave(kwargs['GROUP'], dim=1) for t in (k, v))
    B, H, T, _ = q.shape
    i = torch.arange(T, device=q.device)
    s = q @ k.transpose(-1, -2) * a['sm_scale']
    if kwargs['HAS_ALIBI']:
        s = s + a['Alibi'].double().view(-1, 1, 1) * (i[None, :] - i[:, None])
    s = s.masked_fill(i[None, :] > i[:, None], -math.inf)
    log2e = sk.LOG2E.value
    if name == 'fwd':  # the virtual keys of value 0: the pseudo mass, a sink logit
        virtual = []
        if kwargs['HAS_PSEUDO']:
            virtual.append(log_pseudo_mass(a['Gamma'].double(), i, a['pseudo_len']) + a['offset'])
        if kwargs['HAS_SINK']:
            virtual.append(a['Sink'].double().view(-1, 1).expand(H, T))
        columns = [s, *(x.expand(B, H, T)[..., None] for x in virtual)]
        lse = torch.logsumexp(torch.cat(columns, dim=-1), dim=-1)
        out = torch.exp(s - lse[..., None]) @ v
        a['Out'].copy_(out)
        if kwargs['KEEP_O32']:
            a['Out32'].copy_(out)
        a['LSE'].copy_((lse * log2e).view(B * H, T))
        return
    p = torch.exp(s - a['LSE'].double().view(B, H, T, 1) / log2e)
    do = a['DO'].double()
    delta = (do * (p @ v)).sum(-1)
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None]) * a['sm_scale']
    if name == 'dq':
        a['DQ'].copy_(ds @ k)
        return
    a['DK'].copy_(ds.transpose(-1, -2) @ q)
    a['DV'].copy_(p.transpose(-1, -2) @ do)
    if kwargs['ATOMIC_DQ']:
        a['DQ_ACC'].copy_(ds @ k)


if __name__ == '__main__':
    main()
