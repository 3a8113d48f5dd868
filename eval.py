"""
Evaluate a model as the paper does: the perplexity of a whole validation split (Tables 1-3), and
zero-shot tasks through lm-evaluation-harness (Table 2).

    python eval.py --init_from=out-shakespeare-char           # the val split of the data it trained on
    python eval.py --init_from=out --dataset=wikitext103 --stride=256 --json=True
    python eval.py --init_from=SmolLM2-135M/ --dataset=data/wikitext103_SmolLM2-135M
    python eval.py --init_from=out --tasks=lambada_openai,piqa,arc_easy,arc_challenge,openbookqa,winogrande

Perplexity: every token of the split is scored once, by windows of block_size tokens that move on by
`stride` tokens; a window scores its last `stride` tokens (the first, all of its own), so every scored
token but the first window's sees at least block_size - stride tokens before it. stride = block_size
gives non-overlapping windows (fastest; each window's first tokens see little context). Every row has
the pseudo mass of the training length (SM-I, as in generation). Bits per byte: the total loss in bits
over the UTF-8 bytes of the scored tokens' text (an end-of-text token is no text), which compares
models with different tokenizers, characters and BPE alike.
Tasks: pip install lm_eval; the harness downloads each task's data on first use (a network then).
"""

import json as json_lib
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import load_model, missing_tokenizer
from configurator import autocast_for, configure_script, fail, resolve_device
from corpus import CorpusError, check_ids, dataset_folder, read_dataset
from tokenizer import TokenizerError, tokenizer_from_meta, tokenizer_mismatch

# -----------------------------------------------------------------------------
init_from = 'out'  # a checkpoint file, a folder holding ckpt.pt, or a Hugging Face LLaMA-family folder
dataset = ''  # a folder made by prepare_data.py (a name under data/, or a path); empty: the checkpoint's own
split = 'val'  # the split scored: 'val' or 'train'
block_size = 0  # the windows' length; 0: the model's block_size
stride = 0  # how far each window moves on, and so how many tokens it scores; 0: half the window
batch_size = 8  # windows (or the harness's requests) in one forward pass
max_tokens = 0  # score only the first this many tokens of the split; 0: all of them
tasks = ''  # lm-evaluation-harness tasks, comma-separated (needs lm_eval); with no --dataset, only these
num_fewshot = 0  # examples shown before each question (the paper's Table 2: 0)
limit = 0  # questions per task, for a quick look; 0: every one
include_path = ''  # a folder of your own task YAML files for the harness
tokenizer = ''  # where the Hugging Face tokenizer of a fine-tuned checkpoint is now, if it has moved
json = False  # one line of JSON with every number, instead of the sentences
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', ...; auto: a GPU if there is one
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 on GPUs that have it, else float32
attn_impl = 'auto'  # 'auto', 'triton', 'sdpa', 'reference'
seed = 1337
# -----------------------------------------------------------------------------
RULES = dict(split=('val', 'train'), block_size='>=0', stride='>=0', batch_size='>0', max_tokens='>=0',
             num_fewshot='>=0', limit='>=0', dtype=('auto', 'float32', 'bfloat16', 'float16'),
             attn_impl=('auto', 'triton', 'sdpa', 'reference'))


def windows(n_targets, block, stride):
    """The windows that score each of n_targets predictions once: (start, scored) pairs, each window
    min(block, n_targets) inputs from `start`, of which the last `scored` predictions count."""
    length = min(block, n_targets)
    spans, end = [(0, length)], length
    while end < n_targets:
        step = min(stride, n_targets - end)
        end += step
        spans.append((end - length, step))
    return spans, length


@torch.no_grad()
def score(model, ids, block, stride, batch_size, device, autocast=None, progress=False):
    """(the summed loss in nats, the count of tokens scored) of the token ids (numpy, 1-D) under
    model: each token after the first predicted once, by the windows of windows()."""
    spans, length = windows(len(ids) - 1, block, stride)
    total, count = 0.0, 0
    autocast = autocast or torch.autocast('cpu', enabled=False)
    for first in tqdm(range(0, len(spans), batch_size), desc='windows', unit=' batches',
                      disable=not progress):
        batch = spans[first:first + batch_size]
        x = torch.from_numpy(
            np.stack([ids[s:s + length] for s, _ in batch]).astype(np.int64)).to(device)
        y = torch.from_numpy(
            np.stack([ids[s + 1:s + length + 1] for s, _ in batch]).astype(np.int64)).to(device)
        with autocast:
            logits, _ = model(x, y, pseudo_len=model.config.block_size)
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction='none')  # (B, length)
        for row, (_, scored) in enumerate(batch):
            total += losses[row, length - scored:].double().sum().item()
            count += scored
    return total, count


def text_bytes(decode, ids, chunk=1 << 20):
    """The UTF-8 bytes of the text token ids stand for, decode writing special tokens (end-of-text)
    as none. Decoded a chunk at a time: a character cut at a chunk's edge costs a few bytes in
    millions."""
    return sum(len(decode(ids[i:i + chunk].tolist()).encode('utf-8')) for i in range(0, len(ids), chunk))


def perplexity(model, meta, data_meta, data_dir, device, autocast):
    """The numbers of a split: tokens, mean loss, perplexity, bits per byte."""
    path = os.path.join(data_dir, f"{split}.bin")
    ids = np.memmap(path, dtype=data_meta['dtype'], mode='r')
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        fail(f"the {split} split of {data_dir} has {len(ids)} token(s): nothing to predict")
    try:  # before the scoring: an id past the vocabulary, or a tokenizer that has moved, is one line
        check_ids(path, ids, data_meta['vocab_size'])
        _, decode = tokenizer_from_meta(meta, tokenizer or None, show_special=False)
    except (CorpusError, TokenizerError) as e:
        fail(e)
    window = block_size or model.config.block_size
    step = stride or max(1, window // 2)
    if step > window:
        fail(f"--stride={step} is longer than the window ({window} tokens): "
             f"some tokens would never be scored")
    if model.config.pos_enc == 'learned' and window > model.config.block_size:
        fail(f"--block_size={window} is past the model's {model.config.block_size} learned positions")
    if window > model.config.block_size:  # allowed (extrapolation), but not to be read as the model's own
        print(f"eval.py: note: windows of {window} tokens, past the {model.config.block_size} the model "
              f"was trained on: this measures extrapolation", file=sys.stderr)
    nats, count = score(model, ids, window, step, batch_size, device, autocast, progress=not json)
    n_bytes = text_bytes(decode, np.asarray(ids[1:]))
    loss = nats / count
    return dict(dataset=data_dir, split=split, tokens=count, loss=loss, perplexity=math.exp(loss),
                bytes=n_bytes, bits_per_byte=nats / math.log(2) / n_bytes if n_bytes else None,
                block_size=window, stride=step)


def main():
    global device, dtype
    configure_script(globals(), sys.argv[1:], rules=RULES)
    try:
        device = resolve_device(device)
        model, checkpoint = load_model(init_from, 'cpu', attn_impl=attn_impl, dropout=0.0)
    except ValueError as e:
        fail(e)
    if not checkpoint.get('meta'):
        fail(missing_tokenizer(init_from))
    torch.manual_seed(seed)
    dtype, autocast = autocast_for(device, dtype)
    model.eval().to(device)
    meta = checkpoint['meta']
    data = dataset or (checkpoint.get('config', {}).get('dataset') if not tasks else '')
    if not data and not tasks:
        fail(f"{init_from} does not say what it was trained on: "
             f"pass --dataset=<a folder made by prepare_data.py>")
    report = {}
    if data:
        data_dir = dataset_folder(data)
        try:
            data_meta = read_dataset(data_dir)
        except CorpusError as e:
            fail(e)
        problem = tokenizer_mismatch(meta, data_meta, init_from, data_dir)
        if problem:
            fail(problem)
        if model.config.vocab_size < data_meta['vocab_size']:
            fail(f"{data_dir} has a vocabulary of {data_meta['vocab_size']}, the model's is "
                 f"{model.config.vocab_size}")
        report['perplexity'] = perplexity(model, meta, data_meta, data_dir, device, autocast)
        if not json:
            r = report['perplexity']
            bpb = (f", {r['bits_per_byte']:.4f} bits per byte ({r['bytes']:,} bytes)"
                   if r['bits_per_byte'] else '')
            print(f"{r['split']} of {data_dir}: {r['tokens']:,} tokens scored, "
                  f"windows of {r['block_size']} moving by {r['stride']}: "
                  f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f}{bpb}")
    if tasks:
        try:
            from harness import run_tasks  # imported on use: it needs lm_eval
        except ImportError as e:
            fail(f"--tasks needs lm-evaluation-harness: pip install lm_eval ({e})")
        try:
            results = run_tasks(model, meta, [t for t in tasks.split(',') if t], device, autocast,
                                batch_size, num_fewshot, limit or None, include_path or None,
                                tokenizer or None, quiet=json)
        except (ValueError, KeyError) as e:
            # an unknown task, or text a character model cannot read (TokenizerError)
            fail(e)
        report['tasks'] = results
        if not json:
            print('| task | metric | value | stderr |\n| --- | --- | ---: | ---: |')
            for task, metrics in results.items():
                for metric, (value, err) in metrics.items():
                    print(f"| {task} | {metric} | {value:.4f} | "
                          f"{err if isinstance(err, str) else f'{err:.4f}'} |")
    if json:
        print(json_lib.dumps(report))


if __name__ == '__main__':
    main()
