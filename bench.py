"""
How fast is StableMask? Attention alone, then a whole model training, each measured side by side with
the best plain causal attention in one run, and printed as markdown tables.

    python bench.py            # the full tables (GPU: about 10 minutes; CPU: small sizes)
    python bench.py --quick    # about a minute: on a GPU, bf16 head dim 128 at T = 8k, then the 160M model

On a GPU: our Triton kernel (dQ by atomics, and by its own kernel: the deterministic mode, and the
row that decides which is the default) and our 'sdpa' StableMask path (on cuDNN where auto picks it,
and on flash) against PyTorch's causal SDPA (flash and cuDNN backends: the bar to reach),
FlexAttention computing StableMask exactly, and the materialised reference while its T x T scores
stay small; forward, backward and both; T from 512 to 16384, head dims 64 and 128, bf16 and fp16,
batch x heads filling the GPU (B*T = 16k tokens, H*D = 2048). Then the 160M model's training tokens/s
and MFU with StableMask and with causal attention, at sequence 1024 and 4096. --quick keeps one long
length and compiles only the Triton kernels' few tunings (no FlexAttention, no compiled decoding).
On a CPU: the 'sdpa' path against the reference and causal SDPA at small sizes, and a tiny model.
Under gpu_check.py --dry_run (STABLEMASK_DRY_RUN=1): the GPU's plan on a CPU, its Triton rows only,
with the kernels logged and not run, so that what it would compile is counted; no measurement.
With --data_mb: preparing a generated corpus of that many MB of text (jsonl, GPT-2 BPE): MB/s per
core against tiktoken alone on one thread, and the peak resident memory of all processes together.

The implementations are timed side by side: every repetition runs each in turn (bench.side_by_side),
so a machine that grows busier slows them alike; the tables give medians, the fastest fwd+bwd, and
ratios of medians. TFLOP/s counts 4*B*H*T^2*D/2 for a causal forward and 2.5x that for the backward;
"x SDPA" is SDPA-causal's median time over the row's (above 1 is faster).
B*T is fixed, so memory linear in T shows as a peak-memory column that stays flat as T grows.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from configurator import configure_script, gpu_peak_flops
from model import GPT, PRESETS, GPTConfig, alibi_slopes, log_pseudo_mass
from model import stablemask_reference, stablemask_sdpa

if os.environ.get('STABLEMASK_LAUNCH_LOG'):  # a step of gpu_check.py: every kernel launch logged
    import gpu_check
    import stablemask_kernel
    gpu_check.instrument(stablemask_kernel)

# -----------------------------------------------------------------------------
quick = False  # a smaller table: one head dim and dtype, a few lengths, no FlexAttention
tokens = 16384  # B * T of the attention inputs (on a GPU)
width = 2048  # H * D of the attention inputs (on a GPU)
model_preset = '160M'  # the whole-model benchmark on a GPU ('tiny' on a CPU)
flex = True  # FlexAttention among the implementations on a GPU (its compiles take minutes)
data_mb = 0  # also time prepare_data.py on a generated corpus of this many MB of text (0: not)
attention = True  # the attention and model tables (False with data_mb: the data table alone)
memory = False  # also print the memory each GPU needs under DDP and FSDP, by the estimate in memory_per_gpu
sharding = False  # also time train.py on 2 processes under DDP and under FSDP, alternately (CPUs: gloo)
reps = 0  # repetitions of each side-by-side measurement; 0: each table's own (fewer with --quick)
length = 0  # one sequence length for the attention table instead of its own (0: its own)
decode = True  # the decoding tables
seed = 0
# -----------------------------------------------------------------------------
if __name__ == '__main__':  # imported (the tests do), it keeps its defaults
    configure_script(globals(), sys.argv[1:], rules=dict(
        tokens='>0', width='>0', model_preset=tuple(PRESETS), data_mb='>=0', reps='>=0', length='>=0'))
cuda = torch.cuda.is_available()
device = 'cuda' if cuda else 'cpu'
# gpu_check.py --dry_run: the GPU's plan here, its Triton rows only, the kernels logged (the docstring)
dry_run = not cuda and os.environ.get('STABLEMASK_DRY_RUN') == '1'
gpu_plan = cuda or dry_run
REFERENCE_BYTES = 2 ** 30  # the reference runs while its float32 T x T scores fit in this


def side_by_side(fns, default=None):
    """{name: sorted milliseconds of each repetition} for each fn(): every repetition times each fn
    in turn, starting from a different one each time, so that a machine growing busier or a GPU
    warming up slows them alike. A repetition runs a fn enough times to last a few milliseconds."""
    # --reps, else the table's own
    count = 1 if dry_run else reps or default or (10 if quick else 30 if cuda else 7)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls = {}
    for name, fn in fns.items():  # first calls compile and autotune; then how many calls last 5 ms
        fn(), fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-6)))
    names, times = list(fns), {name: [] for name in fns}
    for rep in range(count):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            sync()
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            sync()
            times[name].append(1e3 * (time.perf_counter() - t0) / calls[name])
    return {name: sorted(t) for name, t in times.items()}


def flex_stablemask(gamma):
    """StableMask with FlexAttention, exactly: one extra key (index T) of value 0 whose score in row i is
    log S_i, beside a causal block mask; flex's own backward then applies. (The other exact way, flex's
    causal output corrected by its log-sum-exp, needs a gradient through the log-sum-exp.) Returns
    attention(q, k, v); its block mask and score modifier are built once per length, outside the
    timings, and reused so the compiled kernel is too."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    prepared = {}

    def attend(q, k, v):
        T = q.size(-2)
        if T not in prepared:
            log_mass = log_pseudo_mass(gamma.to(q.device), torch.arange(T, device=q.device), T)

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx == T, log_mass[h, q_idx].to(score.dtype), score)

            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) | (kv_idx == T)
            prepared[T] = score_mod, create_block_mask(mask_mod, None, None, T, T + 1, device=q.device)
        score_mod, block_mask = prepared[T]
        run = _compiled_flex((q.shape, q.dtype)) if q.is_cuda else flex_attention
        pad = lambda t: F.pad(t, (0, 0, 0, 1))
        return run(q, pad(k), pad(v), score_mod=score_mod, block_mask=block_mask)
    return attend


_flex = {}


def _compiled_flex(shape):
    """torch.compile(flex_attention) for one input shape. dynamo compiles a function again for each new
    shape only up to its recompile limit (8; the full run has about 48), then silently runs it eagerly,
    materialising T x T: so its caches are reset when the shape changes, and every shape is compiled."""
    if shape not in _flex:
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.reset()
        _flex.clear()
        _flex[shape] = torch.compile(flex_attention, dynamic=False)
    return _flex[shape]


def sdpa_causal(backend=None):
    from torch.nn.attention import sdpa_kernel

    def attend(q, k, v):
        with sdpa_kernel(backend) if backend is not None else nullcontext():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attend


def forced(module, name, value, attend):
    """attend with module.name set to value while its forward runs (its backward keeps the choice)."""
    def run(q, k, v):
        before = getattr(module, name)
        setattr(module, name, value)
        try:
            return attend(q, k, v)
        finally:
            setattr(module, name, before)
    return run


def implementations(gamma):
    """name -> attention(q, k, v); the first is the baseline the ratios are taken against. The sink
    rows are causal attention with a learned sink logit per head (gpt-oss's), differentiated too."""
    sink = torch.randn(gamma.numel(), generator=torch.Generator().manual_seed(0))
    sink = sink.to(gamma.device).requires_grad_()
    if not gpu_plan:
        return {'SDPA causal': sdpa_causal(),
                'sdpa StableMask (ours)': lambda q, k, v: stablemask_sdpa(q, k, v, gamma),
                'sdpa causal + sink logit (ours)': lambda q, k, v: stablemask_sdpa(q, k, v, None, sink=sink),
                'reference StableMask': lambda q, k, v: stablemask_reference(q, k, v, gamma)}
    from torch.nn.attention import SDPBackend
    import kernel_configs
    import stablemask_sdpa as sdpa_module
    from stablemask_kernel import stablemask_attention
    flash = lambda device_type, dtype, head_dim, has_bias, capability=None: ('flash', -(-head_dim // 8) * 8)
    ours = lambda q, k, v: stablemask_attention(q, k, v, gamma)
    rows = {'SDPA causal, flash': sdpa_causal(SDPBackend.FLASH_ATTENTION),
            'SDPA causal, cuDNN': sdpa_causal(SDPBackend.CUDNN_ATTENTION),
            'Triton StableMask (ours)': ours,
            # the deterministic backward; against the row above, what decides the default (kernel's DQ)
            'Triton StableMask, dQ by its own kernel (ours)':
                forced(kernel_configs, 'DQ', 'separate', ours),
            **({'Triton causal + sink logit (ours)':
                    lambda q, k, v: stablemask_attention(q, k, v, sink=sink),
                'Triton StableMask + sink logit (ours)':
                    lambda q, k, v: stablemask_attention(q, k, v, gamma, sink=sink)} if not quick else {}),
            'sdpa StableMask (ours)': lambda q, k, v: stablemask_sdpa(q, k, v, gamma),
            **({'sdpa StableMask on flash (ours)': forced(sdpa_module, 'fused_kernel', flash,
                                                         lambda q, k, v: stablemask_sdpa(q, k, v, gamma))}
               if not quick else {}),
            **({'Flex StableMask': flex_stablemask(gamma)} if flex and not quick else {}),
            'reference StableMask': lambda q, k, v: stablemask_reference(q, k, v, gamma)}
    return {name: fn for name, fn in rows.items() if name.startswith('Triton')} if dry_run else rows


def timed_calls(attend, q, k, v, do):
    """attend's forward, backward and both as calls to time (the first forward compiles and tunes)."""
    with torch.no_grad():
        attend(q, k, v)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.autograd.grad(attend(*leaves), leaves, do)
    graph = [attend(*leaves)]  # kept for timing the backward alone

    def forward():
        with torch.no_grad():
            attend(q, k, v)
    return dict(fwd=forward, bwd=lambda: torch.autograd.grad(graph[0], leaves, do, retain_graph=True),
                both=lambda: torch.autograd.grad(attend(*leaves), leaves, do))


def failure(e):
    """A row's reason for having no numbers: out of memory, or a backend this GPU or torch lacks."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return 'out of memory'
    message = str(e).strip().splitlines()[0][:160].replace('|', '/') if str(e).strip() else ''
    return f"failed: {type(e).__name__}: {message}"


def peak_mib(attend, q, k, v, do):
    """Peak GPU memory of a forward and backward beyond the inputs, in MiB (None on a CPU)."""
    if not cuda:
        return None
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(attend(*leaves), leaves, do)
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def attention_table(D, dtype, lengths):
    """Every implementation at each length, each kind of call (forward, backward, both) timed side by
    side: medians, the minimum of fwd+bwd, and ratios of medians against the first, causal SDPA."""
    H = width // D if gpu_plan else 4
    gamma = alibi_slopes(H).to(device)
    impls = implementations(gamma)
    gave_up = {}
    batch = f"B*T = {tokens}" if gpu_plan else "batch 2"
    print(f"\n### Attention, head dim {D}, {str(dtype).removeprefix('torch.')}, {H} heads, {batch}\n")
    print("| T | implementation | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd min ms | fwd+bwd TFLOP/s | x SDPA "
          "| peak MiB |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for T in lengths:
        B = max(1, tokens // T) if gpu_plan else 2
        flops = 3.5 * 4 * B * H * T * T * D / 2
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(4))
        calls, memory, failed = {}, {}, {}
        for name, attend in impls.items():
            if name in gave_up:  # out of memory, or unsupported: longer sequences will not do better
                continue
            if name.startswith('reference') and B * H * T * T * 4 > REFERENCE_BYTES:
                gib = B * H * T * T * 4 / 2 ** 30
                failed[name] = gave_up[name] = f"skipped: its T x T scores ({gib:.1f} GiB) and more"
                continue
            try:
                calls[name] = timed_calls(attend, q, k, v, do)
                memory[name] = peak_mib(attend, q, k, v, do)
            except Exception as e:
                failed[name] = gave_up[name] = failure(e)
                calls.pop(name, None)
            finally:
                if cuda:
                    torch.cuda.empty_cache()
        medians = {}
        for kind in ('fwd', 'bwd', 'both'):
            for name, times in side_by_side({name: c[kind] for name, c in calls.items()}).items():
                medians.setdefault(name, {})[kind] = (statistics.median(times), times[0])
        baseline = next(iter(medians.values()))['both'][0] if medians else None
        for name in impls:
            if name in failed:
                print(f"| {T} | {name} | {failed[name]} | | | | | | |")
            elif name in medians:
                (fwd, _), (bwd, _), (both, fastest) = (medians[name][k] for k in ('fwd', 'bwd', 'both'))
                mem = f"{memory[name]:,.0f}" if memory[name] is not None else '-'
                print(f"| {T} | {name} | {fwd:.3f} | {bwd:.3f} | {both:.3f} | {fastest:.3f} | "
                      f"{flops / both / 1e9:.3g} | {baseline / both:.2f} | {mem} |")
        sys.stdout.flush()
        calls = None


def model_table(preset, runs):
    """Training tokens/s of a whole model (forward, backward, AdamW step), StableMask against causal."""
    peak = gpu_peak_flops(device)
    autocast = torch.amp.autocast(device, dtype=torch.bfloat16) if gpu_plan else nullcontext()
    kind = 'bf16 autocast' if gpu_plan else 'a 256-token vocabulary'
    print(f"\n### Training the {preset} model ({kind}, AdamW)\n")
    print("| T | batch | attention | tokens/s | MFU | x causal |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for T, batch in runs:
        steps = {}
        ours = 'triton' if gpu_plan else 'reference'
        variants = [('causal', 'sdpa'), ('stablemask', ours), ('stablemask', 'sdpa')]
        for mask, impl in variants[1:2] if dry_run else variants:
            # on a CPU a GPT-2 vocabulary's head would drown the attention
            vocab = {} if cuda else dict(vocab_size=256)
            # a dry run's kernels see what the GPU's would (heads, head dim, T) from one layer and one row
            size = dict(PRESETS[preset], n_layer=1) if dry_run else PRESETS[preset]
            batch = 1 if dry_run else batch
            model = GPT(GPTConfig(**size, **vocab, block_size=T, attn_mask=mask, attn_impl=impl)).to(device)
            optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.98), device)
            x = torch.randint(0, model.config.vocab_size, (batch, T), device=device)

            def step(model=model, optimizer=optimizer, x=x):
                with autocast:
                    loss = model(x, x)[1]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            steps[f"{mask} ({impl})"] = step
        # the variants' steps alternate
        times = side_by_side(steps, (5 if quick else 10) if gpu_plan else 3)
        baseline = None
        for name, ms in times.items():
            tokens_per_sec = batch * T / statistics.median(ms) * 1e3
            baseline = baseline or tokens_per_sec
            mfu = f"{100 * model.estimate_mfu(tokens_per_sec, T, peak):.1f}%" if peak else '-'
            print(f"| {T} | {batch} | {name} | {tokens_per_sec:,.0f} | {mfu} | "
                  f"{tokens_per_sec / baseline:.2f} |")
        sys.stdout.flush()


def peak_memory(command, cwd=None):
    """Run command; (seconds, the largest memory of it and all its descendants together, in MiB,
    sampled every 100 ms from Linux's /proc). Each process counts its proportional share (PSS) of
    pages it shares with others (forked workers share their parent's), so nothing counts twice."""
    # not a pipe: a child's progress bar would fill it, then wait for a reader
    log = tempfile.TemporaryFile()
    start, peak = time.time(), 0
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log)
    while proc.poll() is None:
        tree, total = {proc.pid}, 0
        # parents start before their children
        for pid in sorted(int(p) for p in os.listdir('/proc') if p.isdigit()):
            try:
                with open(f'/proc/{pid}/stat') as f:
                    if int(f.read().rpartition(')')[2].split()[1]) in tree:
                        tree.add(pid)
            except OSError:
                pass
        for pid in tree:
            try:
                with open(f'/proc/{pid}/smaps_rollup') as f:
                    total += next(int(line.split()[1]) for line in f if line.startswith('Pss:'))
            except (OSError, StopIteration):
                pass
        peak = max(peak, total / 1024)
        time.sleep(0.1)
    if proc.returncode:
        log.seek(0)
        raise RuntimeError(f"{' '.join(command)} failed: {log.read().decode()[-500:]}")
    return time.time() - start, peak


def generated_corpus(folder, mb, seed=0):
    """A jsonl corpus of `mb` MB of English text: pydoc's help pages cut at random into documents of
    200 to 6,000 characters, numbered. Returns (its path, the documents of its first 20 MB)."""
    import numpy as np
    from pydoc_data.topics import topics
    rng = np.random.default_rng(seed)
    text = '\n'.join(topics[k] for k in sorted(topics))
    path, written, sample = os.path.join(folder, 'corpus.jsonl'), 0, []
    with open(path, 'w') as f:
        while written < mb * 1e6:
            start, length = int(rng.integers(0, len(text) - 6000)), int(rng.integers(200, 6000))
            doc = f"{len(sample)}. {text[start:start + length]}"
            f.write(json.dumps({'text': doc}) + '\n')
            written += len(doc.encode())
            if written < 20e6:
                sample.append(doc)
    return path, sample


def data_table(mb):
    """prepare_data.py on a generated corpus (GPT-2 BPE): MB of text per second per core, against
    tiktoken alone on one thread, and the peak memory of every process it starts."""
    from tokenizer import gpt2_encoding
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as folder:
        path, sample = generated_corpus(folder, mb)
        enc = gpt2_encoding()
        sample_mb = sum(len(d.encode()) for d in sample) / 1e6

        def tiktoken_alone():  # measured again before each run: this machine's speed drifts
            start = time.time()
            for doc in sample:
                # tiktoken's fastest call, the one prepare_data.py makes
                enc.encode_to_numpy(doc, disallowed_special=())
            return sample_mb / (time.time() - start)
        print(f"\n### Preparing {mb:,} MB of text (jsonl, GPT-2 BPE), {cores} cores\n")
        print("| processes | MB/s | MB/s per core | tiktoken alone, one thread, MB/s | "
              "x tiktoken alone, per core | peak MiB, all processes |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for workers in sorted({1, cores}):
            alone = tiktoken_alone()
            script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'prepare_data.py')
            seconds, peak = peak_memory([sys.executable, script, '--input', path, f'--workers={workers}',
                                         f'--out_dir={folder}', f'--name=w{workers}'])
            rate = mb / seconds
            print(f"| {workers} | {rate:.1f} | {rate / workers:.1f} | {alone:.1f} | "
                  f"{rate / workers / alone:.2f} | {peak:,.0f} |")
            sys.stdout.flush()


def decode_table(compiled=False):
    """Generation's tokens/s, StableMask against causal, timed side by side: KV-cached, batch 1 and 8,
    a short generation and one past block_size (the sliding window's cache moves), 6 layers, d 384."""
    how = ', torch.compile' if compiled else ''
    print(f"\n### Decoding, 6 layers, d 384, block_size 256{how} (tokens/s, all rows of a batch)\n")
    print("| batch | new tokens | attention | tokens/s | x causal |")
    print("| ---: | ---: | --- | ---: | ---: |")
    for batch, new in [(1, 64), (8, 64), (1, 320), (8, 320)][:2 if quick else 4]:
        runs = {}
        # the models of earlier rows would use up torch.compile's recompiles of the one forward
        if compiled:
            torch._dynamo.reset()
        for mask in ('causal', 'stablemask'):
            torch.manual_seed(0)
            config = GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256,
                               vocab_size=256 if not cuda else 50257, attn_mask=mask, attn_impl='sdpa')
            model = GPT(config).to(device).eval()
            if compiled:  # as sample.py --compile=True: the fixed-shape cache, one graph a decode step
                model.forward = torch.compile(model.forward)
            prompt = torch.randint(0, model.config.vocab_size, (batch, 16), device=device)

            def generate(model=model, prompt=prompt):
                autocast = torch.amp.autocast('cuda', dtype=torch.bfloat16) if cuda else nullcontext()
                with torch.no_grad(), autocast:
                    model.generate(prompt, new, temperature=0, use_cache='fixed' if compiled else True)
            runs[mask] = generate
        times = side_by_side(runs, 3 if quick else 9)
        causal = batch * new / statistics.median(times['causal']) * 1e3
        for mask, ms in times.items():
            rate = batch * new / statistics.median(ms) * 1e3
            print(f"| {batch} | {new} | {mask} | {rate:,.0f} | {rate / causal:.2f} |")
        sys.stdout.flush()


# Llama 3 8B and 70B as GPTConfig fields, beside the paper's 160M and 1.4B, for the memory table
LLAMA3 = {'8B': dict(n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, n_hidden=14336, vocab_size=128256,
                     tie_embeddings=False),
          '70B': dict(n_layer=80, n_head=64, n_kv_head=8, n_embd=8192, n_hidden=28672, vocab_size=128256,
                      tie_embeddings=False)}


def memory_per_gpu(config, tokens, gpus, fsdp, checkpointing):
    """GiB per GPU for (weights, gradients, AdamW state, activations), estimated: float32 weights,
    gradients and two AdamW moments (4 + 4 + 8 bytes a parameter; FSDP keeps 1/gpus of each, plus one
    block's bf16 weights and gradients gathered, twice for the prefetch), and bf16 activations of one
    micro-batch of `tokens` (per layer about 12 d + 4 f values a token for attention with fused
    kernels, SwiGLU and the norms; with checkpointing the block inputs and one block's; the logits
    in bf16 and float32 for the loss)."""
    with torch.device('meta'):
        model = GPT(GPTConfig(**config))
    n = model.get_num_params()
    d, f, layers = model.config.n_embd, model.transformer.h[0].mlp.c_fc.out_features, model.config.n_layer
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    gathered = 2 * 2 * 2 * block if fsdp else 0  # bf16 weights and gradients, this block and the next
    share = gpus if fsdp else 1
    layer = 2 * tokens * (12 * d + 4 * f)
    activations = 2 * tokens * d * layers + layer if checkpointing else layer * layers
    activations += 6 * tokens * model.config.vocab_size
    gib = lambda b: b / 2 ** 30
    weights = gib(4 * n / share + gathered / 2)
    return weights, weights, gib(8 * n / share), gib(activations), n


def memory_table():
    runs = [('160M', PRESETS['160M'], 16 * 512, 'wikitext103_160m: 16 x 512 a micro-batch'),
            ('1.4B', PRESETS['1.4B'], 8 * 1024, 'pile_1.4b: 8 x 1024'),
            ('Llama 3 8B', LLAMA3['8B'], 8192, 'a fine-tune at 1 x 8192, checkpointing'),
            ('Llama 3 70B', LLAMA3['70B'], 8192, 'a fine-tune at 1 x 8192, checkpointing')]
    print("\n### Memory per GPU, 8 GPUs (GiB, estimated: bench.memory_per_gpu)\n")
    print("| model | parameters | micro-batch | engine | weights | gradients | AdamW state | activations "
          "| total |")
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, config, tokens, batch in runs:
        checkpointing = 'checkpointing' in batch
        for engine in ('DDP', 'FSDP'):
            *parts, n = memory_per_gpu(config, tokens, 8, engine == 'FSDP', checkpointing)
            cells = ' | '.join(f"{p:,.1f}" for p in parts)
            print(f"| {name} | {n / 1e9:.2f}B | {batch} | {engine} | {cells} | {sum(parts):,.1f} |")


def sharding_table():
    """train.py's tokens/s on 2 processes under DDP and under FSDP, run alternately (gloo on CPUs)."""
    import tempfile
    repo = os.path.dirname(os.path.abspath(__file__))
    size = ['--n_layer=4', '--n_head=4', '--n_embd=256', '--block_size=256', '--batch_size=8',
            '--gradient_accumulation_steps=2']
    print("\n### DDP against FSDP, train.py on 2 processes (the tiny model at d 256, 2 x 8 x 256 tokens a "
          "step)\n")
    print("| engine | tokens/s, median of runs | runs | x DDP |")
    print("| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as folder:
        prepare = [sys.executable, os.path.join(repo, 'prepare_data.py'), '--tokenizer=char']
        subprocess.run(prepare, cwd=folder, check=True, capture_output=True)
        rates = {'DDP': [], 'FSDP': []}
        for rep in range(reps or 3):
            for engine in ('DDP', 'FSDP'):
                out = os.path.join(folder, f"out-{engine}-{rep}")
                torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                            '--nproc_per_node=2']
                train = [os.path.join(repo, 'train.py'), *size, '--max_iters=40', '--eval_interval=1000',
                         '--eval_iters=1', '--log_interval=10', f'--fsdp={engine == "FSDP"}',
                         f'--device={device}', f'--out_dir={out}']
                subprocess.run(torchrun + train, cwd=folder, check=True, capture_output=True,
                               env={**os.environ, 'OMP_NUM_THREADS': '1'})
                with open(os.path.join(out, 'log.jsonl')) as f:
                    rows = [json.loads(line) for line in f if 'tokens_per_sec' in line]
                # the first row holds the warm-up
                rates[engine].append(statistics.median(r['tokens_per_sec'] for r in rows[1:]))
        ddp = statistics.median(rates['DDP'])
        for engine, values in rates.items():
            median = statistics.median(values)
            print(f"| {engine} | {median:,.0f} | {len(values)} | {median / ddp:.2f} |")


if __name__ == '__main__':
    torch.manual_seed(seed)
    if memory:
        memory_table()
    if sharding:
        sharding_table()
    if data_mb:
        data_table(data_mb)
    chosen = [length] if length else None
    if attention and gpu_plan:
        from stablemask_kernel import triton  # which, off a GPU, sets TRITON_INTERPRET before importing it
        where = torch.cuda.get_device_name() if cuda else "a dry run (the GPU's plan, kernels logged)"
        print(f"{where}, torch {torch.__version__}, triton {triton.__version__}")
        kinds = [(64, torch.bfloat16), (128, torch.bfloat16), (64, torch.float16), (128, torch.float16)]
        for D, dtype in [(128, torch.bfloat16)] if quick else kinds:
            attention_table(D, dtype, chosen or ([8192] if quick else [512, 1024, 2048, 4096, 8192, 16384]))
        model_table(model_preset, [(1024, 8), (4096, 2)] if quick else [(1024, 16), (4096, 4)])
        if decode and cuda:
            decode_table()
            if not quick:  # its compiles (a 50257-token head, every step's graph) take minutes
                decode_table(compiled=True)
    elif attention:
        print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
        attention_table(64, torch.float32, chosen or ([256, 512] if quick else [256, 512, 1024, 2048]))
        model_table('tiny', [(256, 4)] if quick else [(256, 8), (1024, 2)])
        if decode:
            decode_table()
            if not quick:
                decode_table(compiled=True)
