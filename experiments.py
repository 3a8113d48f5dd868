"""
The paper's four claims, measured with this repository's model on small models (minutes on a CPU):

    python experiments.py position        # absolute position from relative encodings (paper App. B.2, Thm 4.1)
    python experiments.py sinks           # attention sinks, and where StableMask puts that mass (Sec. 3, Fig. 1)
    python experiments.py sinks --init_from=SmolLM2-135M/   # a pretrained model: causal, switched to StableMask, fine-tuned (15 min)
    python experiments.py extrapolation   # 2x and 4x the training length, full and sliding-window (Sec. 5.3)
    python experiments.py lm --shakespeare=input.txt   # causal vs StableMask language modelling, several seeds

Each prints a markdown table and, when matplotlib is installed, saves a figure in out_dir. Settings
below are overridden with --key=value: --steps=2000 --seeds=5 for larger runs. Every run is fixed by
its seed. The models train in-process with AdamW (betas 0.9, 0.98), warmup, cosine decay, clipping 1.
"""

import json
import math
import os
import string
import sys
from contextlib import contextmanager

import numpy as np
import torch

import model as model_module
from configurator import configure_script
from model import GPT, GPTConfig, repeat_kv, resolve_device, stablemask_weights
from prepare_data import PrepareError, prepare

# -----------------------------------------------------------------------------
out_dir = 'out-experiments'  # figures, and the tokenized data
seeds = 0  # runs per setting (seeds 0, 1, ...); 0: each experiment's default
steps = 0  # training steps per run; 0: each experiment's default
device = 'auto'  # 'cpu', 'cuda', ...; auto: a GPU if there is one
plot = True  # save figures (needs matplotlib)
shakespeare = ''  # lm: a local Tiny Shakespeare (downloaded when empty)
tokenizers = 'char,gpt2'  # lm
init_from = ''  # sinks: a Hugging Face LLaMA-family model's folder: pretrained, switched to StableMask, then fine-tuned
# -----------------------------------------------------------------------------
EXPERIMENTS = ('position', 'sinks', 'extrapolation', 'lm')
if __name__ == '__main__':  # imported (the tests do), it keeps its defaults
    named = len(sys.argv) > 1 and sys.argv[1] in EXPERIMENTS
    configure_script(globals(), sys.argv[2:] if named else [a for a in sys.argv[1:] if a in ('-h', '--help')],
                     rules=dict(seeds='>=0', steps='>=0'))


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
    torch.manual_seed(seed)
    return GPT(GPTConfig(**config)).to(device)


def generator(*key):
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(' --- ' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def mean_std(values):
    values = np.array(values)
    return f"{values.mean():.3f} ± {values.std():.3f}" if len(values) > 1 else f"{values[0]:.3f}"


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


def token_data(source, tokenizer, inputs=()):
    """Train and val token ids of a prepare_data.py source (tokenized once into out_dir/data)."""
    name = f"{source}_{os.path.basename(os.path.normpath(tokenizer))}"
    folder = os.path.join(out_dir, 'data', name)
    if not os.path.exists(os.path.join(folder, 'meta.json')):
        prepare(source, list(inputs), tokenizer, name, out_dir=os.path.join(out_dir, 'data'))
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    split = lambda s: torch.from_numpy(np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=meta['dtype']).astype(np.int64))
    return split('train'), split('val'), meta


def lm_batches(data, batch_size, T, seed):
    """batch(step): random windows of data, fixed by (seed, step)."""
    def batch(step):
        ix = torch.randint(len(data) - T - 1, (batch_size,), generator=generator(seed, step))
        x = torch.stack([data[i:i + T] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
        return x.to(device), y.to(device)
    return batch


@torch.no_grad()
def lm_loss(model, data, T, n_batches=8, batch_size=16, pseudo_len=None, window=None):
    """Mean validation loss over fixed stretches of T tokens; window: each token sees only the last
    `window` (the attention of generation past block_size, model.GPT.generate_tokens)."""
    batch = lm_batches(data, batch_size, T, seed=10 ** 6)
    total = 0.0
    for k in range(n_batches):
        x, y = batch(k)
        total += model(x, y, pseudo_len=pseudo_len, window=window)[1].item()
    return total / n_batches


@contextmanager
def attention_replaced_by(fn):
    """Run every attention layer of the model through fn(q, k, v, gamma, alibi, pseudo_len, offset, sink)."""
    original = model_module.attend
    model_module.attend = lambda q, k, v, gamma, alibi, pseudo_len, impl, window=None, offset=0.0, sink=None, shared=None: \
        fn(q, k, v, gamma, alibi, pseudo_len, offset, sink)
    try:
        yield
    finally:
        model_module.attend = original

# -----------------------------------------------------------------------------
# 1. absolute position (paper App. B.2 and Thm 4.1)


POSITION_TASKS = {  # x: random tokens (B, T) -> y: the target at every position
    'identification': lambda x: torch.arange(x.size(1)).expand_as(x),                    # i
    'odd-even': lambda x: (torch.arange(x.size(1)) % 2).expand_as(x),                    # i mod 2
    'mapping': lambda x: x[:, torch.arange(x.size(1)) // 2],                             # the token at floor(i/2)
}


def position():
    """Random-token sequences; at every position predict something only absolute position gives.
    A causal model with relative (or no) positions sees shifted inputs alike (Thm 4.1); StableMask's
    pseudo mass shrinks along the sequence and says where a token is."""
    T, vocab, batch_size, n_steps, n_seeds = 32, 16, 32, steps or 400, seeds or 1
    encodings = ('rope', 'alibi', 'none', 'learned')
    results = {}
    for task, target in POSITION_TASKS.items():
        for pos_enc in encodings:
            for mask in ('causal', 'stablemask'):
                accs = []
                for seed in range(n_seeds):
                    model = new_model(seed, block_size=T, vocab_size=max(vocab, T), n_layer=2, n_head=4, n_embd=64,
                                      pos_enc=pos_enc, attn_mask=mask)

                    def batch(step, seed=seed):
                        x = torch.randint(vocab, (batch_size, T), generator=generator(seed, step))
                        return x.to(device), target(x).to(device)
                    train(model, batch, n_steps, lr=3e-3)
                    x = torch.randint(vocab, (1024, T), generator=generator(10 ** 6))
                    with torch.no_grad():
                        logits = model(x.to(device), x.to(device))[0]
                    accs.append((logits.argmax(-1).cpu() == target(x)).float().mean().item())
                results[task, pos_enc, mask] = accs
    chance = {'identification': 1 / T, 'odd-even': 0.5, 'mapping': 1 / vocab}
    header = ['positions', 'mask'] + [f"{task} (chance {100 * c:.0f}%)" for task, c in chance.items()]
    rows = [[pos_enc, mask] + [f"{100 * np.mean(results[task, pos_enc, mask]):.1f}" for task in POSITION_TASKS]
            for pos_enc in encodings for mask in ('causal', 'stablemask')]
    print(f"\nAccuracy (%) at every position, T={T}, {vocab} random tokens, {n_steps} steps, mean of {n_seeds} seed(s)\n")
    print(table(header, rows))
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5), sharey=True)
        for ax, task in zip(axes, POSITION_TASKS):
            for k, mask in enumerate(('causal', 'stablemask')):
                ax.bar(np.arange(4) + 0.4 * k, [100 * np.mean(results[task, e, mask]) for e in encodings], 0.4, label=mask)
            ax.set_xticks(np.arange(4) + 0.2, encodings)
            ax.set_title(task)
        axes[0].set_ylabel('accuracy %')
        axes[0].legend()
        save(fig, 'position.png')
    return results

# -----------------------------------------------------------------------------
# 2. attention sinks (paper section 3, Fig. 1)


def attention_shares(model, x, punctuation=None):
    """Where the attention of model on x (B, T) goes, averaged over batch and heads, each (layer, T)
    by query position: the share on the first token, on a sink token, on punctuation keys (a (vocab,)
    bool table), and on the virtual key (StableMask's pseudo columns and a sink logit: the mass no
    real key gets); and the attention maps of the first sequence (layer, H, T, T)."""
    weights, n = [], model.n_sink

    def recording(q, k, v, gamma, alibi, pseudo_len, offset, sink):
        W = stablemask_weights(q, k, gamma, alibi, pseudo_len, None, offset, sink)
        weights.append(W)
        return (W @ repeat_kv(v, q.size(1)).to(W.dtype)).to(q.dtype)
    with torch.no_grad(), attention_replaced_by(recording):
        model(x)
    W = torch.stack(weights).cpu()[..., n:, :]  # (layer, B, H, T, n + T): the tokens' rows; a sink token is key 0
    stats = dict(first=W[..., n].mean(dim=(1, 2)), sink=W[..., :n].sum(-1).mean(dim=(1, 2)),
                 virtual=(1 - W.sum(-1)).mean(dim=(1, 2)), maps=W[:, 0, :, :, n:])
    if punctuation is not None:
        stats['punct'] = (W[..., n:] * punctuation[x.cpu()][None, :, None, None, :]).sum(-1).mean(dim=(1, 2))
    return stats


def pretrained_sinks():
    """The paper's Fig. 1 question on a real model, in three states told apart: pretrained (causal),
    the mask switched to StableMask with no update, and after a StableMask fine-tune whose pseudo mass
    grows from none over its first half (train.py's mask_warmup_iters): how much attention each
    layer puts on the first token (its sink) and on the pseudo columns, and each state's validation
    loss, on pydoc's help pages in the model's own tokenizer."""
    T, n_steps, batch = 128, steps or 120, 8
    train_ids, val_ids, meta = token_data('pydoc', init_from)
    x, _ = lm_batches(val_ids, 8, T, seed=10 ** 6)(0)
    val_loss = lambda model: lm_loss(model, val_ids, T, n_batches=4, batch_size=8)
    states, stats, losses = ('pretrained (causal)', 'StableMask, no update', 'StableMask, fine-tuned'), {}, {}
    model = GPT.from_pretrained(init_from, block_size=T).to(device).eval()
    stats[states[0]], losses[states[0]] = attention_shares(model, x), val_loss(model)
    model = GPT.from_pretrained(init_from, block_size=T, attn_mask='stablemask').to(device).eval()
    stats[states[1]], losses[states[1]] = attention_shares(model, x), val_loss(model)
    trained = train(model, lm_batches(train_ids, batch, T, seed=0), n_steps, lr=3e-5, warmup=min(20, n_steps), mask_warmup=n_steps // 2)
    stats[states[2]], losses[states[2]] = attention_shares(model, x), val_loss(model)
    share = lambda state, key, layer=slice(None), first=1: 100 * stats[state][key][layer, first:].mean()
    rows = [[layer] + [f"{share(s, 'first', layer):.1f}" for s in states] + [f"{share(s, 'virtual', layer):.1f}" for s in states[1:]]
            for layer in range(stats[states[0]]['first'].size(0))]
    print(f"\n{init_from}: share of attention (%) by layer, queries 1-{T - 1} of {x.size(0)} validation windows of {T} tokens; "
          f"the fine-tune: {n_steps} steps of {batch} x {T} tokens, lr 3e-5, the pseudo mass grown over the first {n_steps // 2} "
          f"(training loss {trained[0]:.3f} at its first step, {trained[-1]:.3f} at its last)\n")
    print(table(['layer', *(f"first token, {s}" for s in states), *(f"pseudo columns, {s}" for s in states[1:])], rows))
    rows = [[s, f"{losses[s]:.3f}", f"{share(s, 'first'):.1f}", f"{share(s, 'first', first=9):.1f}", f"{share(s, 'virtual'):.1f}"]
            for s in states]
    print("\nMean over layers\n")
    print(table(['state', 'validation loss', 'first token, queries 1-127', 'first token, queries 9-127', 'pseudo columns'], rows))
    return stats


SINK_VARIANTS = {'causal': dict(attn_mask='causal'), 'stablemask': dict(),
                 'learnable sink token': dict(attn_mask='causal', sink_token='learned'),
                 'fixed sink token': dict(attn_mask='causal', sink_token='fixed'),
                 'learned sink logit': dict(attn_mask='causal', sink_logit='learned'),
                 'softmax off by one': dict(attn_mask='causal', sink_logit='zero')}


def sinks():
    """Train a causal and a StableMask model alike, and the other answers to attention sinks (sink
    tokens, sink logits); then measure, on validation text, how much attention goes to the first token,
    to punctuation, to a sink token and to the virtual key (StableMask's pseudo columns, a sink logit),
    by layer and by query position."""
    if init_from:
        return pretrained_sinks()
    T, n_steps = 128, steps or 400
    train_ids, val_ids, meta = token_data('pydoc', 'char')
    punctuation = torch.tensor([c in string.punctuation or c == '\n' for c in meta['chars']])
    stats = {}
    x, _ = lm_batches(val_ids, 32, T, seed=10 ** 6)(0)
    for name, settings in SINK_VARIANTS.items():
        model = new_model(0, block_size=T, vocab_size=meta['vocab_size'], n_layer=4, n_head=4, n_embd=128, **settings)
        train(model, lm_batches(train_ids, 16, T, seed=0), n_steps, lr=2e-3)
        stats[name] = attention_shares(model, x, punctuation)
    # the first token is everything to query 0, so shares are averaged over queries 1.. only
    layers = stats['causal']['first'].size(0)
    rows = [[layer] + [f"{100 * stats[m][key][layer, 1:].mean():.1f}" for key in ('first', 'punct', 'virtual') for m in ('causal', 'stablemask')]
            for layer in range(layers)]
    header = ['layer', 'first token, causal', 'first token, StableMask', 'punctuation, causal', 'punctuation, StableMask',
              'pseudo, causal', 'pseudo, StableMask']
    print(f"\nShare of attention (%) by layer, queries 1-{T - 1}, {T}-character validation windows, models trained {n_steps} steps"
          f" (punctuation and newlines are {100 * punctuation[x.cpu()].float().mean():.1f}% of the characters)\n")
    print(table(header, rows))
    buckets = [(1, 4), (4, 16), (16, 64), (64, T)]
    rows = [[f"{a}-{b - 1}"] + [f"{100 * stats[m][key][:, a:b].mean():.1f}" for key in ('first', 'virtual') for m in ('causal', 'stablemask')]
            for a, b in buckets]
    print("\nShare of attention (%) by query position, mean over layers\n")
    print(table(['query positions', 'first token, causal', 'first token, StableMask', 'pseudo, causal', 'pseudo, StableMask'], rows))
    rows = [[name] + [f"{100 * stats[name][key][:, 1:].mean():.1f}" for key in ('first', 'sink', 'virtual', 'punct')]
            for name in SINK_VARIANTS]
    print("\nShare of attention (%) by model, mean over layers and queries 1-127: where the other answers to sinks put it\n")
    print(table(['model', 'first token', 'sink token', 'virtual key (pseudo columns, sink logit)', 'punctuation'], rows))
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(2, 4, figsize=(14, 7))
        fig.suptitle('attention weights of one validation window, first 64 positions (square root, for contrast)')
        for r, mask in enumerate(('causal', 'stablemask')):
            for c, (layer, head) in enumerate([(0, 0), (1, 1), (layers - 1, 0), (layers - 1, 1)]):
                axes[r, c].imshow(stats[mask]['maps'][layer, head, :64, :64] ** 0.5, cmap='viridis')
                axes[r, c].set_title(f"{mask}, layer {layer}, head {head}", fontsize=9)
                axes[r, c].axis('off')
        save(fig, 'sinks_heads.png')
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mask, style in (('causal', '-'), ('stablemask', '--')):
            ax.plot(100 * stats[mask]['first'].mean(0)[1:], style, label=f"{mask}: first token")
        ax.plot(100 * stats['stablemask']['virtual'].mean(0)[1:], ':', label='stablemask: pseudo mass')
        ax.set_xlabel('query position')
        ax.set_ylabel('% of attention')
        ax.legend()
        save(fig, 'sinks_by_position.png')
    return stats

# -----------------------------------------------------------------------------
# 3. extrapolation (paper section 5.3)


def extrapolation():
    """Train at length N; evaluate at N, 2N and 4N with full attention (SM-I: pseudo_len = N) and with a
    sliding window of N keys, as a KV cache of the training length that drops its oldest entry and
    keeps no sink tokens (what sample.py does past block_size). The paper: under the window a causal
    RoPE model's loss blows up, having learnt to lean on the first tokens, and StableMask's stays flat."""
    N, n_steps, n_seeds = 64, steps or 300, seeds or 2
    train_ids, val_ids, meta = token_data('pydoc', 'char')
    lengths = (N, 2 * N, 4 * N)
    results = {}
    for pos_enc in ('rope', 'alibi'):
        for mask in ('causal', 'stablemask'):
            losses = {}
            for seed in range(n_seeds):
                model = new_model(seed, block_size=N, vocab_size=meta['vocab_size'], n_layer=4, n_head=4, n_embd=128,
                                  pos_enc=pos_enc, attn_mask=mask)
                train(model, lm_batches(train_ids, 16, N, seed), n_steps, lr=2e-3)
                for L in lengths:
                    losses.setdefault(('full', L), []).append(lm_loss(model, val_ids, L, pseudo_len=N))
                    losses.setdefault(('window', L), []).append(lm_loss(model, val_ids, L, pseudo_len=N, window=N))
            results[pos_enc, mask] = losses
    header = ['model'] + [f"{kind} {L // N}x" for kind in ('full', 'window') for L in lengths]
    rows = [[f"{pos_enc}, {mask}"] + [mean_std(results[pos_enc, mask][kind, L]) for kind in ('full', 'window') for L in lengths]
            for pos_enc, mask in results]
    print(f"\nValidation loss at 1x, 2x and 4x the training length N={N} ({n_steps} steps, {n_seeds} seed(s): mean ± standard deviation)\n")
    print(table(header, rows))
    plt = pyplot()
    if plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
        for ax, kind in zip(axes, ('full', 'window')):
            for (pos_enc, mask), losses in results.items():
                ax.plot([L // N for L in lengths], [np.mean(losses[kind, L]) for L in lengths], 'o-' if mask == 'stablemask' else 's--',
                        label=f"{pos_enc}, {mask}")
            ax.set_title(f"{kind} attention")
            ax.set_xlabel('sequence length / N')
        axes[0].set_ylabel('validation loss')
        axes[0].legend()
        save(fig, 'extrapolation.png')
    return results

# -----------------------------------------------------------------------------
# 4. language modelling A/B


LM_VARIANTS = [  # (positions, name, GPTConfig settings, the paper's MiniPile perplexity (Table 3) or '')
    ('rope', 'causal (pseudo value -inf)', dict(attn_mask='causal'), '22.5'),
    ('rope', 'learnable sink token', dict(attn_mask='causal', sink_token='learned'), '21.6'),
    ('rope', 'fixed sink token', dict(attn_mask='causal', sink_token='fixed'), '22.4'),
    ('rope', 'pseudo value 0', dict(sm_gamma=0.0), '21.5'),
    ('rope', 'pseudo value constant (-2)', dict(sm_gamma=0.0, sm_offset=-2.0), '22.2'),
    ('rope', 'StableMask (positional decay)', dict(), '21.1'),
    ('rope', 'learned sink logit (gpt-oss)', dict(attn_mask='causal', sink_logit='learned'), ''),
    ('rope', 'softmax off by one', dict(attn_mask='causal', sink_logit='zero'), ''),
    ('rope', 'StableMask + learned sink logit', dict(sink_logit='learned'), ''),
    ('alibi', 'causal (pseudo value -inf)', dict(attn_mask='causal'), ''),
    ('alibi', 'StableMask (positional decay)', dict(), ''),
]


def lm():
    """The paper's Table 3 at one budget for all: causal attention, a learnable and a fixed sink token,
    pseudo values 0, a constant (the paper does not say which; -2 here) and the positional decay
    (StableMask); and today's answers to the same problem: a learned sink logit per head (gpt-oss),
    softmax off by one, and StableMask with a learned sink logit. Tiny Shakespeare, RoPE (and two ALiBi
    rows), both tokenizers, several seeds."""
    T, n_steps, n_seeds = 64, steps or 200, seeds or 2
    results = {}
    for tokenizer in tokenizers.split(','):
        train_ids, val_ids, meta = token_data('shakespeare', tokenizer, [shakespeare] if shakespeare else [])
        vocab_size, n_embd = meta['vocab_size'], 128
        if tokenizer == 'gpt2':  # a CPU economy, the same for every variant: only the 11k BPE tokens that occur
            used, compact = torch.unique(torch.cat([train_ids, val_ids]), return_inverse=True)
            train_ids, val_ids, vocab_size, n_embd = compact[:len(train_ids)], compact[len(train_ids):], len(used), 64
        for pos_enc, name, settings, _ in LM_VARIANTS:
            curves, finals = [], []
            for seed in range(n_seeds):
                model = new_model(seed, block_size=T, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=n_embd,
                                  pos_enc=pos_enc, **settings)
                curves.append(train(model, lm_batches(train_ids, 16, T, seed), n_steps, lr=2e-3))
                finals.append(lm_loss(model, val_ids, T))
            results[tokenizer, pos_enc, name] = dict(curves=curves, final=finals)
    rows = []
    for tokenizer in tokenizers.split(','):
        base = {p: np.mean(results[tokenizer, p, LM_VARIANTS[0][1]]['final']) for p in ('rope', 'alibi')}
        for pos_enc, name, _, paper in LM_VARIANTS:
            finals = results[tokenizer, pos_enc, name]['final']
            rows.append([tokenizer, pos_enc, name, mean_std(finals), f"{np.mean(finals) - base[pos_enc]:+.3f}",
                         f"{math.exp(np.mean(finals)):.2f}", paper])
    print(f"\nTiny Shakespeare validation loss after {n_steps} steps of 16 x {T} tokens ({n_seeds} seeds: mean ± standard deviation)\n")
    print(table(['tokenizer', 'positions', 'attention', 'val loss', 'vs causal', 'perplexity', 'paper (MiniPile perplexity)'], rows))
    plt = pyplot()
    if plt:
        toks = tokenizers.split(',')
        fig, axes = plt.subplots(1, len(toks), figsize=(7 * len(toks), 4), squeeze=False)
        for ax, tokenizer in zip(axes[0], toks):
            for pos_enc, name, _, _ in LM_VARIANTS:
                curves = np.array(results[tokenizer, pos_enc, name]['curves'])
                smooth = np.array([np.convolve(c, np.ones(20) / 20, mode='valid') for c in curves])
                ax.plot(smooth.mean(0), label=f"{pos_enc}, {name}")
            ax.set_title(f"Tiny Shakespeare, {tokenizer}")
            ax.set_xlabel('step')
            ax.set_ylabel('training loss')
        axes[0, 0].legend(fontsize=7)
        save(fig, 'lm.png')
    return results


if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] not in EXPERIMENTS:
        sys.exit(f"experiments.py: error: name an experiment: {', '.join(EXPERIMENTS)} (then --key=value settings)")
    try:
        device = resolve_device(device)
        os.makedirs(out_dir, exist_ok=True)
        globals()[sys.argv[1]]()
    except (PrepareError, ValueError) as e:
        sys.exit(f"experiments.py: error: {e}")
