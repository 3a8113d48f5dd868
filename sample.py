"""
Sample text from a trained checkpoint, streamed as it is generated.

    python sample.py --init_from=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=out/ckpt.pt --start=FILE:prompt.txt --temperature=0 --max_new_tokens=100
    python sample.py --init_from=SmolLM2-135M/ --start="The capital of France"   # a Hugging Face model's folder
    python sample.py --init_from=SmolLM2-135M-Instruct/ --chat=True --start="What is the capital of France?"

Generation uses a KV cache under the paper's SM-I inference: every position keeps the pseudo mass it
had at the training length, so a cached step computes exactly what a full forward pass would. Past
block_size each new token attends to the last block_size tokens, a length the model was trained at
(a cache that drops its oldest entry); --sliding_window=False keeps the whole context instead.
Ctrl-C stops it: the text generated so far is written, then one line, and it exits with 130.
"""

import signal
import sys

import torch

from configurator import configure_script
from model import autocast_for, load_model, resolve_device
from prepare_data import PrepareError, tokenizer_from_meta
from pretrained import chat_prompt

# -----------------------------------------------------------------------------
init_from = 'out'  # a checkpoint file, a folder holding ckpt.pt, or a Hugging Face LLaMA-family model's folder
tokenizer = ''  # where the Hugging Face tokenizer of a fine-tuned checkpoint is now, if it has moved
start = "\n"  # the prompt; FILE:path reads it from a file. Empty: the end-of-text token (GPT-2 BPE)
num_samples = 3  # generated together, as one batch
max_new_tokens = 500
temperature = 0.8  # 0: greedy
top_k = 200  # None: no top-k cut
top_p = None  # nucleus sampling: keep the smallest set of tokens holding this much probability
sliding_window = True  # past block_size, attend to the last block_size tokens; False: the whole context
seed = 1337
device = 'auto'  # 'cpu', 'cuda', 'cuda:1', ...; auto: a GPU if there is one
dtype = 'auto'  # 'float32', 'bfloat16', 'float16'; auto: bf16 on GPUs that have it, else float32
attn_impl = 'auto'  # 'auto', 'triton', 'sdpa', 'reference'
use_cache = True  # False recomputes the whole context at every step (same tokens, slower)
compile = False  # torch.compile the model; its KV cache keeps one shape, so the decode step compiles once
chat = False  # the prompt as a user's message in the model's chat template (a Hugging Face model's, or its fine-tune's); stops at its end-of-turn token
show_special = False  # write special tokens (<|endoftext|>, <|im_start|>, ...) in the text
# -----------------------------------------------------------------------------
RULES = dict(num_samples='>0', max_new_tokens='>=0', temperature='>=0', top_k='>0', top_p='>0, <=1',
             dtype=('auto', 'float32', 'bfloat16', 'float16'), attn_impl=('auto', 'triton', 'sdpa', 'reference'))
configure_script(globals(), sys.argv[1:], nullable=('top_k',), rules=RULES)


def fail(message):
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def interrupted(signum=None, frame=None, what=''):
    """Ctrl-C: one line, and the shell's exit status for it (130); what is written stays."""
    print(f"sample.py: interrupted{what}", file=sys.stderr)
    sys.exit(130)


signal.signal(signal.SIGINT, interrupted)  # until generation, which ends its step and writes what it made

try:
    device = resolve_device(device)
    model, checkpoint = load_model(init_from, device, attn_impl=attn_impl, dropout=0.0)
except ValueError as e:
    fail(e)
device_type = 'cuda' if device.startswith('cuda') else 'cpu'
dtype, autocast = autocast_for(device_type, dtype)
torch.manual_seed(seed)
meta = checkpoint.get('meta')
if not meta:
    fail(f"{init_from} holds no tokenizer description (meta); was it written by train.py?")
model.eval().to(device)
if compile:  # the forward that generation calls, with a fixed-shape cache: a graph for the prompt, one for every decode step
    model.forward = torch.compile(model.forward)
    if use_cache:
        use_cache = 'fixed'

if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompt file {start[5:]}: {e}")
if chat:
    if meta['tokenizer'] != 'hf':
        fail(f"--chat=True formats the prompt with a Hugging Face model's chat template; this model's tokenizer is {meta['tokenizer']}")
    try:
        start = chat_prompt(tokenizer or meta['tokenizer_path'], start)
    except ValueError as e:
        fail(e)
try:
    encode, decode = tokenizer_from_meta(meta, tokenizer or None, show_special)
except PrepareError as e:
    fail(e)
try:
    start_ids = encode(start)
except PrepareError as e:
    fail(f"the prompt: {e}")
if chat:
    start = decode(start_ids)  # as the text shows it: special tokens only with --show_special
if not start_ids:
    if 'eot_token' not in meta:
        fail("the prompt is empty and this tokenizer has no end-of-text token to start from")
    start_ids = [meta['eot_token']]

x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, ...].repeat(num_samples, 1)  # one batch: a forward a step for all
end = meta.get('eot_token') if chat else None  # a chat answer ends at the end of its turn
samples, done = [[] for _ in range(num_samples)], [False] * num_samples
line, shown = [], ''  # one sample streams: the tokens since the last line break, and how much of their text is written
if num_samples == 1:
    sys.stdout.write(start)
stopped = False


def stop_generating(signum, frame):
    """Ctrl-C while generating: the step ends and what was made is written (a second one stops at once)."""
    global stopped
    stopped = True
    signal.signal(signal.SIGINT, interrupted)


signal.signal(signal.SIGINT, stop_generating)
with torch.no_grad(), autocast:
    for step in model.generate_tokens(x, max_new_tokens, temperature, top_k, top_p, use_cache, sliding_window):
        for row, token in enumerate(step[:, 0].tolist()):
            if done[row] or (token == end and not show_special):
                done[row] = True
                continue
            done[row] = token == end
            samples[row].append(token)
            if num_samples == 1:
                line.append(token)
                text = decode(line)  # decoded together: a token can hold part of a character, or a space for the next
                if not text.endswith('\ufffd'):  # a character split across tokens waits for its last part
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    line, shown = ([], '') if text.endswith('\n') else (line, text)
        if all(done) or stopped:
            break
signal.signal(signal.SIGINT, interrupted)
if num_samples == 1:
    sys.stdout.write(decode(line)[len(shown):] + '\n---------------\n')
else:
    for tokens in samples:
        sys.stdout.write(start + decode(tokens) + '\n---------------\n')
if stopped:
    sys.stdout.flush()  # the text first, then the line
    interrupted(what=f" after {max(map(len, samples))} new tokens")
