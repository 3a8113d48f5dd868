"""
The paper's claims, measured with this repository's model on small models, over paired seeds:

    python experiments.py position        # absolute position from relative encodings (App. B.2, Thm 4.1)
    python experiments.py sinks           # attention sinks, and where StableMask puts that mass (Sec. 3)
    python experiments.py sinks --init_from=SmolLM2-135M-Instruct/   # a pretrained model made StableMask
    python experiments.py extrapolation   # 2x and 4x the training length, full and sliding-window (Sec. 5.3)
    python experiments.py lm --shakespeare=input.txt --positions=rope   # Table 3, today's sinks (and alibi)
    python experiments.py quickstart      # the README's quickstart with each mask: train.py, then eval.py
    python experiments.py readme          # results/verdict.md, then every results table into README.md

Each experiment writes its tables to results_dir/<name>.md and .json (with the command, commit, torch
version, thread count, seeds, steps, wall time and every seed's numbers) and, with matplotlib, figures
to out_dir; it refuses to replace earlier results unless --overwrite=True. Comparisons are paired:
both arms of a seed see the same batches and start from the same value of every parameter they share;
each reports the mean, the sample standard deviation and the paired difference with its 95%
t-interval, and calls an arm ahead or behind only when that interval excludes zero. A run is bitwise
repeatable on one kind of CPU with one thread count (--threads) and torch version; elsewhere its
roundings may differ, and training carries a rounding on into different numbers.
The models train in-process with AdamW (betas 0.9, 0.98), warmup, cosine decay, clipping 1.
"""

import glob
import json
import math
import os
import re
import string
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

import model as model_module
from checkpoint import from_pretrained, load_model
from configurator import configure_script, resolve_device
from model import GPT, GPTConfig, repeat_kv, stablemask_weights
from prepare_data import PrepareError, prepare
from run_dir import atomic_file
from tokenizer import read_json, tokenizer_from_meta

# -----------------------------------------------------------------------------
out_dir = 'out-experiments'  # figures, and the tokenized data
results_dir = 'results'  # each experiment's tables: <name>.md and <name>.json
overwrite = False  # replace an experiment's earlier results in results_dir
seeds = 0  # paired runs per arm (seeds 0, 1, ...); 0: each experiment's default
steps = 0  # training steps per run; 0: each experiment's default
eval_batches = 0  # validation batches per loss; 0: each experiment's default (fewer: for quick checks)
threads = 1  # CPU threads; a run repeats bit for bit at one thread count (one CPU kind, torch version)
device = 'auto'  # 'cpu', 'cuda', ...; auto: a GPU if there is one
plot = True  # save figures (needs matplotlib)
shakespeare = ''  # lm: a local Tiny Shakespeare (downloaded when empty)
tokenizer = 'char'  # lm: 'char' or 'gpt2'
positions = 'rope'  # lm: 'rope' or 'alibi', a table each
init_from = ''  # sinks: a Hugging Face LLaMA-family model's folder: pretrained, switched, fine-tuned
readme_file = 'README.md'  # readme: the file whose marked tables it refreshes
# -----------------------------------------------------------------------------
EXPERIMENTS = ('position', 'sinks', 'extrapolation', 'lm', 'quickstart', 'readme')
if __name__ == '__main__':  # imported (the tests do), it keeps its defaults
    named = len(sys.argv) > 1 and sys.argv[1] in EXPERIMENTS
    asked = sys.argv[2:] if named else [a for a in sys.argv[1:] if a in ('-h', '--help')]
    configure_script(globals(), asked,
                     rules=dict(seeds='>=0', steps='>=0', eval_batches='>=0', threads='>0',
                                positions=('rope', 'alibi')))

# -----------------------------------------------------------------------------
# statistics: paired seeds, a 95% t-interval, and the word it allows

# Student's t, two-sided 95% (the 0.975 quantile), for 1 to 30 degrees of freedom; past 30, 30's
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def mean_sd(values):
    """(mean, sample standard deviation with ddof=1) of a list of numbers; the SD of one is nan."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan


def paired_difference(arm, base):
    """arm - base over paired seeds (lists in seed order): (mean, low, high), the 95% t-interval."""
    d = np.asarray(arm, dtype=float) - np.asarray(base, dtype=float)
    if len(d) < 2:
        raise ValueError("a paired interval needs two seeds or more")
    mean, sd = mean_sd(d)
    half = T_975[min(len(d) - 1, len(T_975)) - 1] * sd / math.sqrt(len(d))
    return mean, mean - half, mean + half


def verdict(low, high, below='ahead', above='behind'):
    """The word for an interval of arm - baseline: `below` if it lies under zero (for a loss: ahead),
    `above` if over it, and 'level within noise' if it holds zero."""
    return below if high < 0 else above if low > 0 else 'level within noise'


def compare(key, arm, base, unit, below='ahead', above='behind'):
    """One paired comparison as the results' JSON keeps it."""
    diff, low, high = paired_difference(arm, base)
    return dict(key=key, unit=unit, diff=diff, low=low, high=high, n=len(arm),
                word=verdict(low, high, below, above))


def spread(values, digits=3):
    """'mean ± SD' (sample SD)."""
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def interval(c, digits=3):
    """'+0.014 [-0.010, +0.038]': a comparison's mean difference and its 95% interval."""
    return f"{c['diff']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"

# -----------------------------------------------------------------------------
# training and data


def train(model, batch, n_steps, lr, warmup=50, mask_warmup=0):
    """Train in place: batch(step) -> (x, y). Returns the loss of every step. mask_warmup: StableMask's
    pseudo mass grows from none over this many steps (train.py's mask_warmup_iters)."""
    optimizer = model.configure_optimizers(0.1, lr, (0.9, 0.98), device)
    losses = []
    model.train()
    for step in range(n_steps):
        model.scale_pseudo_mass(min(1.0, step / mask_warmup) if mask_warmup else 1.0)
        ratio = max(0.0, (step - warmup) / max(1, n_steps - warmup))
        for group in optimizer.param_groups:  # warmup, then cosine decay to a tenth
            group['lr'] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))
        x, y = batch(step)
        loss = model(x, y)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.scale_pseudo_mass(1.0)
    model.eval()
    return losses


def new_model(seed, **config):
    """A GPT whose shared parameters start alike for every arm of a seed: sink tokens, sink logits and
    gates take no draw from the seeded generator (model.py), so they shift nothing."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**config)).to(device)


def generator(*key):
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def seed_list(default):
    if seeds == 1:
        raise ValueError("seeds=1: a paired comparison needs two seeds or more (3 or more to mean much)")
    return list(range(seeds or default))


def token_data(source, tokenizer_name, inputs=()):
    """Train and val token ids of a prepare_data.py source (tokenized once into out_dir/data)."""
    name = f"{source}_{os.path.basename(os.path.normpath(tokenizer_name))}"
    folder = os.path.join(out_dir, 'data', name)
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        prepare(source, list(inputs), tokenizer_name, name, out_dir=os.path.join(out_dir, 'data'))
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    split = lambda s: np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=meta['dtype']).astype(np.int64)
    return torch.from_numpy(split('train')), torch.from_numpy(split('val')), meta


def lm_batches(data, batch_size, T, seed):
    """batch(step): random windows of data, fixed by (seed, step): the same for every arm of a seed."""
    def batch(step):
        ix = torch.randint(len(data) - T - 1, (batch_size,), generator=generator(seed, step))
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        return x.to(device), y.to(device)
    return batch


@torch.no_grad()
def lm_loss(model, data, T, n_batches=8, batch_size=16, pseudo_len=None, window=None):
    """Mean validation loss over fixed stretches of T tokens (the same for every model; eval_batches
    of them when set); window: each token sees only the last `window` (generation past block_size)."""
    batch = lm_batches(data, batch_size, T, seed=10 ** 6)
    n_batches = eval_batches or n_batches
    total = 0.0
    for k in range(n_batches):
        x, y = batch(k)
        total += model(x, y, pseudo_len=pseudo_len, window=window)[1].item()
    return total / n_batches


@contextmanager
def attention_replaced_by(fn):
    """Run every attention layer of the model through fn(q, k, v, layer, p), model.attend's arguments."""
    original = model_module.attend
    model_module.attend = fn
    try:
        yield
    finally:
        model_module.attend = original

# -----------------------------------------------------------------------------
# results: markdown and JSON, and the README's copies of their tables


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(' --- ' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def markdown_tables(text):
    """The markdown tables in text, each as its list of lines."""
    tables, current = [], []
    for line in text.splitlines() + ['']:
        if line.startswith('|'):
            current.append(line)
        elif current:
            tables, current = tables + [current], []
    return tables


def git_commit():
    """(HEAD's commit, whether tracked files differ from it), or (None, None) outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *args: subprocess.run(['git', *args], cwd=here, capture_output=True, text=True,
                                           timeout=30)
        head, status = git('rev-parse', 'HEAD'), git('status', '--porcelain', '--untracked-files=no')
    except (OSError, subprocess.SubprocessError):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def results_name(experiment):
    """The results file an experiment writes, by its settings."""
    if experiment == 'sinks' and init_from:
        return 'sinks_pretrained'
    if experiment == 'lm':
        return f"lm_{os.path.basename(os.path.normpath(tokenizer))}_{positions}"
    return experiment


def check_results_free(name):
    """Before any training: earlier results are replaced only when asked."""
    for ext in ('md', 'json'):
        path = os.path.join(results_dir, f"{name}.{ext}")
        if os.path.exists(path) and not overwrite:
            raise ValueError(f"{path} holds an earlier run's results: --overwrite=True replaces them "
                             f"(or write elsewhere with --results_dir)")


def write_atomically(path, text):
    with atomic_file(path, 'w') as f:
        f.write(text)


def record_markdown(record):
    """The markdown of a results record: one line on how it was made, then each table under its title."""
    commit = (record['commit'] or 'unknown')[:12]
    commit += ' with uncommitted changes' if record['uncommitted'] else ''
    first, last = record['seeds'][0], record['seeds'][-1]
    lines = [f"`{record['command']}`: commit {commit}, torch {record['torch']}, {record['threads']} "
             f"thread(s), {record['device']}, seeds {first}-{last}, {record['steps']} steps, "
             f"{record['wall_s'] / 60:.1f} min", '']
    for t in record['tables']:
        lines += [t['title'], '', table(t['header'], t['rows']), '']
    return '\n'.join(lines)


def write_results(name, result, wall_s):
    """results_dir/name.json (everything) and name.md (the tables), each written aside then renamed."""
    commit, uncommitted = git_commit()
    record = dict(experiment=name, command=' '.join(['python experiments.py'] + sys.argv[1:]), commit=commit,
                  uncommitted=uncommitted, torch=torch.__version__, threads=torch.get_num_threads(),
                  device=device, wall_s=round(wall_s, 1), **result)
    os.makedirs(results_dir, exist_ok=True)
    write_atomically(os.path.join(results_dir, f"{name}.json"), json.dumps(record, indent=1) + '\n')
    write_atomically(os.path.join(results_dir, f"{name}.md"), record_markdown(record))
    for t in record['tables']:
        print(f"\n{t['title']}\n\n{table(t['header'], t['rows'])}")
    print(f"\nresults: {os.path.join(results_dir, name)}.md and .json ({wall_s / 60:.1f} min)")


def pyplot():
    if not plot:
        return None
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def save(fig, name):
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=120, bbox_inches='tight')
    print(f"\nfigure: {path}")

# -----------------------------------------------------------------------------
# 1. absolute position (paper App. B.2 and Thm 4.1)


POSITION_TASKS = {  # x: random tokens (B, T) -> y: the target at every position
    'identification': lambda x: torch.arange(x.size(1)).expand_as(x),  # i
    'odd-even': lambda x: (torch.arange(x.size(1)) % 2).expand_as(x),  # i mod 2
    'mapping': lambda x: x[:, torch.arange(x.size(1)) // 2],  # the token at floor(i/2)
}
ENCODINGS = ('rope', 'alibi', 'none', 'learned')


def position_accuracy(target, pos_enc, mask, seed, T, vocab, n_steps):
    """Accuracy (%) over 1,024 fresh sequences of a 2-layer model trained on the task."""
    model = new_model(seed, block_size=T, vocab_size=max(vocab, T), n_layer=2, n_head=4, n_embd=64,
                      pos_enc=pos_enc, attn_mask=mask)

    def batch(step):
        x = torch.randint(vocab, (32, T), generator=generator(seed, step))
        return x.to(device), target(x).to(device)
    train(model, batch, n_steps, lr=3e-3)
    x = torch.randint(vocab, (1024, T), generator=generator(10 ** 6))
    with torch.no_grad():
        logits = model(x.to(device), x.to(device))[0]
    return 100 * (logits.argmax(-1).cpu() == target(x)).float().mean().item()


def position():
    """Random-token sequences; at every position predict something only absolute position gives.
    A causal model with relative (or no) positions sees shifted inputs alike (Thm 4.1); StableMask's
    pseudo mass shrinks along the sequence and says where a token is."""
    T, vocab, n_steps, run_seeds = 32, 16, steps or 400, seed_list(5)
    acc = {}  # (task, positions, mask) -> an accuracy per seed
    for task, target in POSITION_TASKS.items():
        for pos_enc in ENCODINGS:
            for mask in ('causal', 'stablemask'):
                acc[task, pos_enc, mask] = [position_accuracy(target, pos_enc, mask, seed, T, vocab, n_steps)
                                            for seed in run_seeds]
    comparisons = [compare(f"{task}, {pos_enc}: StableMask - causal", acc[task, pos_enc, 'stablemask'],
                           acc[task, pos_enc, 'causal'], 'points', below='behind', above='ahead')
                   for pos_enc in ENCODINGS for task in POSITION_TASKS]
    chance = {'identification': 1 / T, 'odd-even': 0.5, 'mapping': 1 / vocab}
    tasks = [f"{task} (chance {100 * c:.0f}%)" for task, c in chance.items()]
    accuracy = [[pos_enc, mask] + [spread(acc[task, pos_enc, mask], 1) for task in POSITION_TASKS]
                for pos_enc in ENCODINGS for mask in ('causal', 'stablemask')]
    by_key = {c['key']: c for c in comparisons}
    gains = [[pos_enc] + [f"{interval(c, 1)} {c['word']}" for c in
                          (by_key[f"{task}, {pos_enc}: StableMask - causal"] for task in POSITION_TASKS)]
             for pos_enc in ENCODINGS]
    tables = [dict(title=f"Accuracy (%) at every position, T={T}, {vocab} random tokens, {n_steps} steps: "
                         f"mean ± SD over {len(run_seeds)} seeds", header=['positions', 'mask'] + tasks,
                   rows=accuracy),
              dict(title="StableMask - causal, accuracy points: paired mean difference [95% interval]",
                   header=['positions'] + list(POSITION_TASKS), rows=gains)]
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
        for ax, task in zip(axes, POSITION_TASKS):
            for k, mask in enumerate(('causal', 'stablemask')):
                ax.bar(np.arange(4) + 0.4 * k, [np.mean(acc[task, e, mask]) for e in ENCODINGS], 0.4,
                       yerr=[np.std(acc[task, e, mask], ddof=1) for e in ENCODINGS], label=mask)
            ax.set_xticks(np.arange(4) + 0.2, ENCODINGS)
            ax.set_title(task)
        axes[0].set_ylabel('accuracy %')
        axes[0].legend()
        save(fig, 'position.png')
    values = {f"{task}, {pos_enc}, {mask}": v for (task, pos_enc, mask), v in acc.items()}
    return dict(seeds=run_seeds, steps=n_steps, tables=tables, values=values, comparisons=comparisons,
                settings=dict(T=T, vocab=vocab, n_layer=2, n_embd=64, batch=32))

# -----------------------------------------------------------------------------
# 2. attention sinks (paper section 3, Fig. 1)


def attention_shares(model, x, punctuation=None):
    """Where the attention of model on x (B, T) goes, averaged over batch and heads, each (layer, T)
    by query position: the share on the first token, on a sink token, on punctuation keys (a (vocab,)
    bool table), and on the virtual key (StableMask's pseudo columns and a sink logit: the mass no
    real key gets); and the attention maps of the first sequence (layer, H, T, T)."""
    weights, n = [], model.n_sink

    def recording(q, k, v, layer, p):
        W = stablemask_weights(q, k, layer.gamma, layer.alibi, p.pseudo_len, None, layer.offset, layer.sink)
        weights.append(W)
        return (W @ repeat_kv(v, q.size(1)).to(W.dtype)).to(q.dtype)
    with torch.no_grad(), attention_replaced_by(recording):
        model(x)
    # (layer, B, H, T, n + T): the tokens' rows; a sink token is key 0
    W = torch.stack(weights).cpu()[..., n:, :]
    stats = dict(first=W[..., n].mean(dim=(1, 2)), sink=W[..., :n].sum(-1).mean(dim=(1, 2)),
                 virtual=(1 - W.sum(-1)).mean(dim=(1, 2)), maps=W[:, 0, :, :, n:])
    if punctuation is not None:
        stats['punct'] = (W[..., n:] * punctuation[x.cpu()][None, :, None, None, :]).sum(-1).mean(dim=(1, 2))
    return stats


def layer_groups(n_layer):
    """At most three groups of consecutive layers, each with its label ('0-9', or '3' alone)."""
    groups = np.array_split(np.arange(n_layer), min(3, n_layer))
    return [(g, f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}") for g in groups]


def pretrained_sinks():
    """The paper's Fig. 1 question on a real model, in three states told apart: pretrained (causal),
    the mask switched to StableMask with no update, and after a StableMask fine-tune whose pseudo mass
    grows from none over its first half (train.py's mask_warmup_iters), one per seed (its batches):
    how much attention each layer puts on the first token (its sink) and on the pseudo columns, and
    each state's validation loss, on pydoc's help pages in the model's own tokenizer."""
    T, n_steps, batch, run_seeds = 128, steps or 60, 8, seed_list(3)
    train_ids, val_ids, meta = token_data('pydoc', init_from)
    x, _ = lm_batches(val_ids, 8, T, seed=10 ** 6)(0)

    def measure(model):
        model.eval()
        loss = lm_loss(model, val_ids, T, n_batches=4, batch_size=8)
        return dict(shares=attention_shares(model, x), loss=loss)
    load = lambda mask: from_pretrained(init_from, block_size=T, **mask).to(device)
    pretrained, switched = measure(load({})), measure(load(dict(attn_mask='stablemask')))
    tuned, curves = [], []
    for seed in run_seeds:
        model = load(dict(attn_mask='stablemask'))
        curves.append(train(model, lm_batches(train_ids, batch, T, seed), n_steps, lr=3e-5,
                            warmup=max(1, n_steps // 6), mask_warmup=n_steps // 2))
        tuned.append(measure(model))
    states = {'pretrained (causal)': [pretrained], 'StableMask, no update': [switched],
              'StableMask, fine-tuned': tuned}
    name = os.path.basename(os.path.normpath(init_from))
    first, last = np.mean([c[0] for c in curves]), np.mean([c[-1] for c in curves])
    title = (f"{name}: share of attention (%) by layer, queries 1-{T - 1} of {x.size(0)} validation "
             f"windows of {T} tokens; the fine-tune: {n_steps} steps of {batch} x {T} tokens, lr 3e-5, the "
             f"pseudo mass grown over the first {n_steps // 2}, mean of {len(run_seeds)} seeds (training "
             f"loss {first:.3f} at its first step, {last:.3f} at its last)")
    result = pretrained_tables(states, title, len(run_seeds))
    settings = dict(model=name, T=T, batch=batch, lr=3e-5)
    return dict(seeds=run_seeds, steps=n_steps, settings=settings, **result)


def share(measured, key, layers=slice(None), first=1):
    """The share (%) of attention of a measured model on `key`, over layers and queries first.."""
    return 100 * measured['shares'][key][layers, first:].mean().item()


PRETRAINED_MEASURES = {'validation loss': lambda m: m['loss'],
                       'first token, queries 1-127': lambda m: share(m, 'first'),
                       'first token, queries 9-127': lambda m: share(m, 'first', first=9),
                       'pseudo columns': lambda m: share(m, 'virtual')}


def pretrained_tables(states, title, n_seeds):
    """pretrained_sinks' tables, comparisons and values from its states {name: [measured, ...]}."""
    (_, (pretrained,)), _, (_, tuned) = states.items()
    n_layer = pretrained['shares']['first'].size(0)
    mean_share = lambda ms, key, layers: f"{np.mean([share(m, key, layers) for m in ms]):.1f}"
    by_layer = [[label] + [mean_share(ms, 'first', g) for ms in states.values()]
                + [mean_share(ms, 'virtual', g) for ms in list(states.values())[1:]]
                for g, label in layer_groups(n_layer)]
    digits = {name: 3 if name == 'validation loss' else 1 for name in PRETRAINED_MEASURES}
    summary = [[state] + [f"{np.mean([f(m) for m in ms]):.{digits[name]}f}"
                          for name, f in PRETRAINED_MEASURES.items()] for state, ms in states.items()]
    comparisons, paired = [], []
    for name, f in PRETRAINED_MEASURES.items():
        ours = [f(m) for m in tuned]
        c = compare(f"{name}: fine-tuned - pretrained", ours, [f(pretrained)] * len(tuned),
                    'nats' if name == 'validation loss' else 'points', below='lower', above='higher')
        comparisons.append(c)
        paired.append([name, spread(ours, digits[name]), interval(c, digits[name]), c['word']])
    tables = [dict(title=title, header=['layers', *(f"first token, {s}" for s in states),
                                        *(f"pseudo columns, {s}" for s in list(states)[1:])], rows=by_layer),
              dict(title="Mean over layers (the fine-tuned state: mean of its seeds)",
                   header=['state'] + list(PRETRAINED_MEASURES), rows=summary),
              dict(title=f"Fine-tuned - pretrained over {n_seeds} fine-tunes: the fine-tuned state's mean "
                         "± SD, the paired difference [95% interval]",
                   header=['measure', 'fine-tuned', 'fine-tuned - pretrained', 'verdict'], rows=paired)]
    values = {f"{state}: {name}": [f(m) for m in ms] for state, ms in states.items()
              for name, f in PRETRAINED_MEASURES.items()}
    return dict(tables=tables, values=values, comparisons=comparisons)


SINK_VARIANTS = {'causal': dict(attn_mask='causal'), 'stablemask': dict(),
                 'learnable sink token': dict(attn_mask='causal', sink_token='learned'),
                 'fixed sink token': dict(attn_mask='causal', sink_token='fixed'),
                 'learned sink logit': dict(attn_mask='causal', sink_logit='learned'),
                 'softmax off by one': dict(attn_mask='causal', sink_logit='zero'),
                 'gated attention': dict(attn_mask='causal', attn_gate='elementwise')}
QUERY_BUCKETS = ((1, 4), (4, 16), (16, 64), (64, 128))


def sink_shares(settings, seed, T, n_steps, data, x, punctuation):
    """One model trained on the pydoc text: its validation loss, and its shares of attention (%):
    mean over layers and queries 1.. by kind, by layer, and by bucket of query positions."""
    train_ids, val_ids, vocab_size = data
    model = new_model(seed, block_size=T, vocab_size=vocab_size, n_layer=4, n_head=4, n_embd=128, **settings)
    train(model, lm_batches(train_ids, 16, T, seed), n_steps, lr=2e-3)
    stats = attention_shares(model, x, punctuation)
    shares = {key: 100 * stats[key][:, 1:].mean().item() for key in ('first', 'sink', 'virtual', 'punct')}
    for key in ('first', 'virtual'):
        shares[f"{key} by layer"] = (100 * stats[key][:, 1:].mean(1)).tolist()
        shares[f"{key} by query"] = [100 * stats[key][:, a:b].mean().item() for a, b in QUERY_BUCKETS]
    return dict(loss=lm_loss(model, val_ids, T), maps=stats['maps'][:, :2, :64, :64], **shares)


def sinks():
    """Train a causal and a StableMask model alike, and the other answers to attention sinks (sink
    tokens, sink logits, gated attention); then measure, on validation text, how much attention goes
    to the first token, to punctuation, to a sink token and to the virtual key (StableMask's pseudo
    columns, a sink logit), by layer and by query position."""
    if init_from:
        return pretrained_sinks()
    T, n_steps, run_seeds = 128, steps or 400, seed_list(3)
    train_ids, val_ids, meta = token_data('pydoc', 'char')
    punctuation = torch.tensor([c in string.punctuation or c == '\n' for c in meta['chars']])
    x, _ = lm_batches(val_ids, 32, T, seed=10 ** 6)(0)
    data = (train_ids, val_ids, meta['vocab_size'])
    runs = {name: [sink_shares(settings, seed, T, n_steps, data, x, punctuation) for seed in run_seeds]
            for name, settings in SINK_VARIANTS.items()}
    of = lambda name, key: [r[key] for r in runs[name]]
    others = list(SINK_VARIANTS)[1:]
    comparisons = [compare(f"first token: {name} - causal", of(name, 'first'), of('causal', 'first'),
                           'points', below='less', above='more') for name in others]
    comparisons += [compare(f"loss: {name} - causal", of(name, 'loss'), of('causal', 'loss'), 'nats')
                    for name in others]
    against = {name: f"{interval(c, 1)} {c['word']}" for name, c in zip(others, comparisons)}
    models = [[name, spread(of(name, 'loss')), spread(of(name, 'first'), 1), against.get(name, '')]
              + [spread(of(name, key), 1) for key in ('sink', 'virtual', 'punct')] for name in SINK_VARIANTS]
    shown = ('causal', 'stablemask', 'gated attention')
    mean_of = lambda name, key, i: f"{np.mean([r[key][i] for r in runs[name]]):.1f}"
    row = lambda label, by, i: [label] + [mean_of(name, f"first {by}", i) for name in shown] \
        + [mean_of('stablemask', f"virtual {by}", i)]
    header = [f"first token, {name}" for name in shown] + ['pseudo columns, stablemask']
    punct = 100 * punctuation[x.cpu()].float().mean().item()
    tables = [dict(title=f"By model: validation loss and share of attention (%), mean over layers and "
                         f"queries 1-{T - 1} of 32 windows of {T} characters, trained {n_steps} steps; "
                         f"mean ± SD over {len(run_seeds)} seeds, and the first token's share against "
                         "causal (paired, [95% interval])",
                   header=['model', 'validation loss', 'first token', 'first token - causal', 'sink token',
                           'virtual key (pseudo columns, sink logit)',
                           f"punctuation ({punct:.1f}% of characters)"],
                   rows=models),
              dict(title="By layer, queries 1-127 (mean of the seeds)", header=['layer'] + header,
                   rows=[row(str(layer), 'by layer', layer) for layer in range(4)]),
              dict(title="By query position, mean over layers (mean of the seeds)",
                   header=['query positions'] + header,
                   rows=[row(f"{a}-{b - 1}", 'by query', i) for i, (a, b) in enumerate(QUERY_BUCKETS)])]
    plot_sinks(runs)
    values = {name: {key: of(name, key) for key in ('loss', 'first', 'sink', 'virtual', 'punct')}
              for name in runs}
    return dict(seeds=run_seeds, steps=n_steps, tables=tables, values=values, comparisons=comparisons,
                settings=dict(T=T, n_layer=4, n_embd=128, batch=16, data='pydoc_char'))


def plot_sinks(runs):
    """Attention maps of seed 0 (causal and StableMask), and the first token's share by query bucket."""
    plt = pyplot()
    if not plt:
        return
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    fig.suptitle('attention weights of one validation window, first 64 positions, seed 0 (square root, '
                 'for contrast)')
    for r, mask in enumerate(('causal', 'stablemask')):
        for c, (layer, head) in enumerate([(0, 0), (1, 1), (3, 0), (3, 1)]):
            axes[r, c].imshow(runs[mask][0]['maps'][layer, head] ** 0.5, cmap='viridis')
            axes[r, c].set_title(f"{mask}, layer {layer}, head {head}", fontsize=9)
            axes[r, c].axis('off')
    save(fig, 'sinks_heads.png')
    fig, ax = plt.subplots(figsize=(6, 3.5))
    buckets = [f"{a}-{b - 1}" for a, b in QUERY_BUCKETS]
    for name in runs:
        ax.plot(buckets, np.mean([r['first by query'] for r in runs[name]], 0), 'o-', label=name)
    ax.set_xlabel('query positions')
    ax.set_ylabel('% of attention on the first token')
    ax.legend(fontsize=7)
    save(fig, 'sinks_by_position.png')

# -----------------------------------------------------------------------------
# 3. extrapolation (paper section 5.3)


EXTRAPOLATION_ARMS = {  # name: (GPTConfig settings, the arm it is compared with)
    'rope, causal': (dict(pos_enc='rope', attn_mask='causal'), None),
    'rope, StableMask': (dict(pos_enc='rope'), 'rope, causal'),
    'rope, gated attention': (dict(pos_enc='rope', attn_mask='causal', attn_gate='elementwise'),
                              'rope, causal'),
    'alibi, causal': (dict(pos_enc='alibi', attn_mask='causal'), None),
    'alibi, StableMask': (dict(pos_enc='alibi'), 'alibi, causal'),
}


def extrapolation():
    """Train at length N; evaluate at N, 2N and 4N with full attention (SM-I: pseudo_len = N) and with a
    sliding window of N keys, as a KV cache of the training length that drops its oldest entry and
    keeps no sink tokens (what sample.py does past block_size). The paper: under the window a causal
    RoPE model's loss blows up, having learnt to lean on the first tokens, and StableMask's stays flat."""
    N, n_steps, run_seeds = 64, steps or 1000, seed_list(5)
    train_ids, val_ids, meta = token_data('pydoc', 'char')
    columns = [(kind, L) for kind in ('full', 'window') for L in (N, 2 * N, 4 * N)]
    losses = {}  # (arm, kind, L) -> a loss per seed
    for name, (settings, _) in EXTRAPOLATION_ARMS.items():
        for seed in run_seeds:
            model = new_model(seed, block_size=N, vocab_size=meta['vocab_size'], n_layer=4, n_head=4,
                              n_embd=128, **settings)
            train(model, lm_batches(train_ids, 16, N, seed), n_steps, lr=2e-3)
            for kind, L in columns:
                loss = lm_loss(model, val_ids, L, pseudo_len=N, window=N if kind == 'window' else None)
                losses.setdefault((name, kind, L), []).append(loss)
    compared = [(name, base) for name, (_, base) in EXTRAPOLATION_ARMS.items() if base]
    comparisons = [compare(f"{name} - {base}, {kind} {L // N}x", losses[name, kind, L],
                           losses[base, kind, L], 'nats') for name, base in compared for kind, L in columns]
    header = ['model'] + [f"{kind} {L // N}x" for kind, L in columns]
    rows = [[name] + [spread(losses[name, kind, L]) for kind, L in columns] for name in EXTRAPOLATION_ARMS]
    cells = iter(f"{interval(c)} {c['word']}" for c in comparisons)
    diffs = [[f"{name} - {base}"] + [next(cells) for _ in columns] for name, base in compared]
    tables = [dict(title=f"Validation loss at 1x, 2x and 4x the training length N={N}, full attention and a "
                         f"window of N keys ({n_steps} steps; mean ± SD over {len(run_seeds)} seeds)",
                   header=header, rows=rows),
              dict(title="Against causal attention with the same positions: paired mean difference "
                         "[95% interval]", header=['comparison'] + header[1:], rows=diffs)]
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
        for ax, kind in zip(axes, ('full', 'window')):
            for name in EXTRAPOLATION_ARMS:
                means = [np.mean(losses[name, kind, L]) for L in (N, 2 * N, 4 * N)]
                ax.plot([1, 2, 4], means, 'o-', label=name)
            ax.set_title(f"{kind} attention")
            ax.set_xlabel('sequence length / N')
        axes[0].set_ylabel('validation loss')
        axes[0].legend(fontsize=7)
        save(fig, 'extrapolation.png')
    values = {f"{name}, {kind} {L // N}x": v for (name, kind, L), v in losses.items()}
    return dict(seeds=run_seeds, steps=n_steps, tables=tables, values=values, comparisons=comparisons,
                settings=dict(N=N, n_layer=4, n_embd=128, batch=16, data='pydoc_char'))

# -----------------------------------------------------------------------------
# 4. language modelling: the paper's Table 3, and today's sinks


LM_VARIANTS = [  # (name, GPTConfig settings, the paper's MiniPile perplexity with RoPE (Table 3) or '')
    ('causal (pseudo value -inf)', dict(attn_mask='causal'), '22.5'),
    ('learnable sink token', dict(attn_mask='causal', sink_token='learned'), '21.6'),
    ('fixed sink token', dict(attn_mask='causal', sink_token='fixed'), '22.4'),
    ('pseudo value 0', dict(sm_gamma=0.0), '21.5'),
    ('pseudo value constant (-2)', dict(sm_gamma=0.0, sm_offset=-2.0), '22.2'),
    ('StableMask (positional decay)', dict(), '21.1'),
    ('learned sink logit (gpt-oss)', dict(attn_mask='causal', sink_logit='learned'), ''),
    ('softmax off by one', dict(attn_mask='causal', sink_logit='zero'), ''),
    ('gated attention (Qwen3-Next)', dict(attn_mask='causal', attn_gate='elementwise'), ''),
    ('StableMask + gated attention', dict(attn_gate='elementwise'), ''),
]
# the largest model that trains all 30 runs of a table in about an hour on one thread (README, Experiments)
LM_MODEL = dict(n_layer=4, n_head=4, n_embd=128)
LM_T, LM_BATCH = 256, 16


def lm():
    """The paper's Table 3 at one budget for all: causal attention, a learnable and a fixed sink token,
    pseudo values 0, a constant (the paper does not say which; -2 here) and the positional decay
    (StableMask); and today's answers to the same problem: a learned sink logit per head (gpt-oss),
    softmax off by one, gated attention (Qwen3-Next), and StableMask with the gate. Tiny Shakespeare,
    one tokenizer and one position encoding a table, every arm on the same seeds."""
    T, n_steps, run_seeds = LM_T, steps or 300, seed_list(3)
    train_ids, val_ids, meta = token_data('shakespeare', tokenizer, [shakespeare] if shakespeare else [])
    vocab_size = meta['vocab_size']
    if meta.get('tokenizer') == 'gpt2':  # a CPU economy, the same for every arm: the BPE tokens that occur
        used, compact = torch.unique(torch.cat([train_ids, val_ids]), return_inverse=True)
        train_ids, val_ids, vocab_size = compact[:len(train_ids)], compact[len(train_ids):], len(used)
    curves, finals = {}, {}
    for name, settings, _ in LM_VARIANTS:
        for seed in run_seeds:
            model = new_model(seed, block_size=T, vocab_size=vocab_size, pos_enc=positions, **LM_MODEL,
                              **settings)
            batches = lm_batches(train_ids, LM_BATCH, T, seed)
            curves.setdefault(name, []).append(train(model, batches, n_steps, lr=2e-3))
            finals.setdefault(name, []).append(lm_loss(model, val_ids, T, n_batches=16))
    params = GPT(GPTConfig(block_size=T, vocab_size=vocab_size, **LM_MODEL)).get_num_params()
    plot_lm(curves)
    settings = dict(T=T, batch=LM_BATCH, params=params, positions=positions, tokenizer=tokenizer, **LM_MODEL)
    return dict(seeds=run_seeds, steps=n_steps, values=finals, settings=settings,
                **lm_tables(finals, n_steps, len(run_seeds), params))


def lm_tables(finals, n_steps, n_seeds, params):
    """lm's tables and comparisons from its final losses {arm: [a loss per seed]}."""
    causal, stablemask = LM_VARIANTS[0][0], LM_VARIANTS[5][0]
    versus_causal = [compare(f"{name} - causal", finals[name], finals[causal], 'nats')
                     for name, _, _ in LM_VARIANTS[1:]]
    versus_stablemask = [compare(f"StableMask - {name}", finals[stablemask], finals[name], 'nats')
                         for name, _, _ in LM_VARIANTS if name != stablemask]
    paper = positions == 'rope'
    rows = [[name, spread(finals[name]), f"{math.exp(np.mean(finals[name])):.2f}"]
            + ([interval(c), c['word']] if c else ['', '']) + ([ppl] if paper else [])
            for (name, _, ppl), c in zip(LM_VARIANTS, [None] + versus_causal)]
    others = [[c['key'].removeprefix('StableMask - '), interval(c), c['word']] for c in versus_stablemask]
    tokens = n_steps * LM_BATCH * LM_T
    tables = [dict(title=f"Tiny Shakespeare ({tokenizer}), {positions}: validation loss after {n_steps} "
                         f"steps of {LM_BATCH} x {LM_T} tokens ({tokens / 1e6:.1f}M tokens; "
                         f"{LM_MODEL['n_layer']} layers, d {LM_MODEL['n_embd']}, {params / 1e6:.2f}M "
                         f"parameters); mean ± SD over {n_seeds} seeds, and against causal: paired mean "
                         "difference [95% interval]",
                   header=['attention', 'val loss', 'perplexity', 'vs causal', 'verdict']
                   + (['paper (MiniPile perplexity, 160M)'] if paper else []), rows=rows),
              dict(title="StableMask (positional decay) against each other arm: paired mean difference "
                         "[95% interval]",
                   header=['other arm', 'StableMask - other arm', 'verdict'], rows=others)]
    return dict(tables=tables, comparisons=versus_causal + versus_stablemask)


def plot_lm(curves):
    plt = pyplot()
    if not plt:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in curves.items():
        smooth = np.array([np.convolve(c, np.ones(20) / 20, mode='valid') for c in runs])
        ax.plot(smooth.mean(0), label=name)
    ax.set_title(f"Tiny Shakespeare, {tokenizer}, {positions}")
    ax.set_xlabel('step')
    ax.set_ylabel('training loss, mean of the seeds')
    ax.legend(fontsize=7)
    save(fig, f"lm_{positions}.png")

# -----------------------------------------------------------------------------
# 5. the README's quickstart, as a user runs it: train.py, then eval.py's perplexity


QUICKSTART_STRIDES = (128, 64, 16)


def quickstart():
    """train.py config/train_pydoc_char.py with each mask on paired seeds (a seed fixes the batches
    and the initial weights, which StableMask does not change), then the perplexity of the whole
    validation split by eval.py's windows at three strides, and bits per byte."""
    from eval import score, text_bytes
    n_steps, run_seeds = steps or 500, seed_list(3)
    _, val_ids, meta = token_data('pydoc', 'char')
    data = os.path.join(out_dir, 'data', 'pydoc_char')
    # the whole split, or for a quick check the first eval_batches windows' worth
    ids = val_ids.numpy()[:eval_batches * 1024 + 1] if eval_batches else val_ids.numpy()
    n_bytes = text_bytes(tokenizer_from_meta(meta, show_special=False)[1], ids[1:])
    repo = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    values = {}  # (mask, column) -> a number per seed
    for mask in ('causal', 'stablemask'):
        for seed in run_seeds:
            run = os.path.join(out_dir, f"quickstart-{mask}-{seed}")
            config = os.path.join(repo, 'config', 'train_pydoc_char.py')
            command = [sys.executable, os.path.join(repo, 'train.py'), config, f"--dataset={data}",
                       f"--attn_mask={mask}", f"--seed={seed}", f"--max_iters={n_steps}", f"--out_dir={run}",
                       '--overwrite=True', f"--device={device}"]
            started = time.time()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode:
                raise ValueError(f"train.py failed: {done.stderr.strip().splitlines()[-1]}")
            values.setdefault((mask, 'train minutes'), []).append((time.time() - started) / 60)
            model, _ = load_model(run, device, dropout=0.0)
            model.eval()
            for stride in QUICKSTART_STRIDES:
                nats, count = score(model, ids, model.config.block_size, stride, 8, device)
                values.setdefault((mask, f"loss, stride {stride}"), []).append(nats / count)
                if stride == QUICKSTART_STRIDES[-1]:
                    bits = nats / math.log(2) / n_bytes
                    values.setdefault((mask, 'bits per byte, stride 16'), []).append(bits)
    columns = [f"loss, stride {s}" for s in QUICKSTART_STRIDES] + ['bits per byte, stride 16']
    comparisons = [compare(f"StableMask - causal, {c}", values['stablemask', c], values['causal', c],
                           'nats' if c.startswith('loss') else 'bits per byte') for c in columns]
    rows = [[mask] + [spread(values[mask, c], 4) for c in columns] for mask in ('causal', 'stablemask')]
    rows.append(['StableMask - causal'] + [f"{interval(c, 4)} {c['word']}" for c in comparisons])
    # no training times here: a wall clock on a shared machine measures its neighbours (bench.py
    # times the two masks side by side); each run's minutes stay in the JSON's values
    title = (f"The quickstart's model (config/train_pydoc_char.py: 4 layers, d 128, block_size 128, "
             f"{n_steps} steps), the whole val split of pydoc_char ({len(ids) - 1:,} predictions, "
             f"{n_bytes:,} bytes) by eval.py's windows; mean ± SD over {len(run_seeds)} seeds, and the "
             f"paired difference [95% interval]")
    tables = [dict(title=title, header=['model'] + columns, rows=rows)]
    flat = {f"{mask}, {c}": v for (mask, c), v in values.items()}
    return dict(seeds=run_seeds, steps=n_steps, tables=tables, values=flat, comparisons=comparisons,
                settings=dict(config='config/train_pydoc_char.py', strides=list(QUICKSTART_STRIDES)))


# -----------------------------------------------------------------------------
# the verdict, and the README's tables


CLAIMS = [  # (the claim, the paper's number, its results file, the comparison, the sign the claim gives it)
    ('StableMask gives a RoPE model absolute position (identification; App. B.2)',
     'causal RoPE 24.7%; solved', 'position', 'identification, rope: StableMask - causal', +1),
    ('... and the token at floor(i/2) (mapping; App. B.2)', 'causal RoPE 25.3%; solved',
     'position', 'mapping, rope: StableMask - causal', +1),
    ('... and an ALiBi model too (identification; App. B.2)', 'causal ALiBi 26.7%; solved',
     'position', 'identification, alibi: StableMask - causal', +1),
    ('StableMask takes attention off the first token (Sec. 3, Fig. 1)', 'a figure, no number',
     'sinks', 'first token: stablemask - causal', -1),
    ('... also in a pretrained model fine-tuned into StableMask', 'not in the paper',
     'sinks_pretrained', 'first token, queries 1-127: fine-tuned - pretrained', -1),
    ('A sliding window at 4x the training length leaves StableMask RoPE flat, causal not (Sec. 5.3)',
     'a figure: causal explodes', 'extrapolation', 'rope, StableMask - rope, causal, window 4x', -1),
    ('StableMask lowers the language-model loss, RoPE (Table 3)',
     '-0.064 nats (ppl 22.5 to 21.1, MiniPile, 160M)', 'lm_char_rope',
     'StableMask (positional decay) - causal', -1),
    ('... and with ALiBi', 'claimed for ALiBi too; no number in our notes',
     'lm_char_alibi', 'StableMask (positional decay) - causal', -1),
    ('StableMask beats a learnable sink token (Table 3)', '-0.023 nats (ppl 21.1 against 21.6)',
     'lm_char_rope', 'StableMask - learnable sink token', -1),
    ('The positional decay beats pseudo value 0 (Table 3)', '-0.019 nats (ppl 21.1 against 21.5)',
     'lm_char_rope', 'StableMask - pseudo value 0', -1),
    ('Gated attention takes attention off the first token (Qiu et al., 2025)',
     'first-token share 46.7% to 4.8%', 'sinks', 'first token: gated attention - causal', -1),
    ('Gated attention lowers the language-model loss (Qiu et al., 2025)', 'lower perplexity at 1.7B and 15B',
     'lm_char_rope', 'gated attention (Qwen3-Next) - causal', -1),
]


def claim_row(claim, number, source, key, sign):
    """[claim, paper, ours, verdict]: supported when our interval lies on the claimed side of zero,
    contradicted when on the other, else not seen at this scale; pending without results."""
    path = os.path.join(results_dir, f"{source}.json")
    if not os.path.exists(path):
        return [claim, number, f"pending (results/{source}.json)", 'pending']
    c = next((c for c in read_json(results_dir, f"{source}.json")['comparisons'] if c['key'] == key), None)
    if c is None:
        raise ValueError(f"{path} has no comparison {key!r}: made by an older experiments.py? run it again")
    low, high = sorted((sign * c['low'], sign * c['high']))
    word = 'supported' if low > 0 else 'contradicted' if high < 0 else 'not seen at this scale'
    ours = f"{interval(c, 3 if c['unit'] == 'nats' else 1)} {c['unit']}, {c['n']} seeds (results/{source})"
    return [claim, number, ours, word]


MARKER = re.compile(r'<!-- results/([\w.-]+)\.md(?:#(\d+))? -->')
PENDING = '*(pending: the command above writes this table; `python experiments.py readme` copies it here)*'


def refreshed_readme(text):
    """text with the block after every marker `<!-- results/NAME.md -->` (or `...md#K`, its K-th table)
    made that table of results_dir/NAME.md, or the PENDING line while there is no such file."""
    lines, out, n = text.split('\n'), [], 0
    while n < len(lines):
        out.append(lines[n])
        marker = MARKER.fullmatch(lines[n].strip())
        n += 1
        if not marker:
            continue
        while n < len(lines) and (lines[n].startswith('|') or lines[n] == PENDING):
            n += 1
        path = os.path.join(results_dir, f"{marker.group(1)}.md")
        if not os.path.exists(path):
            out.append(PENDING)
            continue
        with open(path) as f:
            tables = markdown_tables(f.read())
        k = int(marker.group(2) or 1)
        if k > len(tables):
            raise ValueError(f"{readme_file} marks table {k} of {path}, which has {len(tables)}")
        out += tables[k - 1]
    return '\n'.join(out)


def readme():
    """results_dir/verdict.md from the other results, then every marked table of readme_file refreshed."""
    # a mistyped folder would make every table pending again
    if not os.path.isdir(results_dir):
        raise ValueError(f"results_dir={results_dir} is no folder: name the one the experiments wrote")
    rows = [claim_row(*claim) for claim in CLAIMS]
    sources = {}
    for path in sorted(glob.glob(os.path.join(results_dir, '*.json'))):
        record = read_json(results_dir, os.path.basename(path))
        if record['experiment'] != 'verdict':
            sources[record['experiment']] = dict(command=record['command'], commit=record['commit'])
    title = "Each claim, the paper's number, ours (a paired difference [95% interval]) and the verdict"
    tables = [dict(title=title, header=['claim', 'paper', 'ours', 'verdict'], rows=rows)]
    record = dict(experiment='verdict', command='python experiments.py readme', sources=sources,
                  tables=tables)
    os.makedirs(results_dir, exist_ok=True)
    write_atomically(os.path.join(results_dir, 'verdict.json'), json.dumps(record, indent=1) + '\n')
    write_atomically(os.path.join(results_dir, 'verdict.md'), "Built by `python experiments.py readme` from "
                     f"the results beside it.\n\n{title}\n\n{table(tables[0]['header'], rows)}\n")
    with open(readme_file) as f:
        text = f.read()
    new = refreshed_readme(text)
    if new != text:
        write_atomically(readme_file, new)
    print(f"{os.path.join(results_dir, 'verdict.md')} written; {readme_file} "
          f"{'refreshed' if new != text else 'unchanged'}")


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in EXPERIMENTS:
        sys.exit(f"experiments.py: error: name an experiment: {', '.join(EXPERIMENTS)} "
                 "(then --key=value settings)")
    try:
        torch.set_num_threads(threads)
        device = resolve_device(device)
        if sys.argv[1] == 'readme':
            readme()
            sys.exit(0)
        name = results_name(sys.argv[1])
        check_results_free(name)
        os.makedirs(out_dir, exist_ok=True)
        start = time.time()
        result = globals()[sys.argv[1]]()
        write_results(name, result, time.time() - start)
    except (PrepareError, ValueError, OSError) as e:
        sys.exit(f"experiments.py: error: {e}")
