"""
Sample text from a trained checkpoint, streamed as it is generated.

    python sample.py --init_from=out-shakespeare-char --start="ROMEO:" --num_samples=3
    python sample.py --init_from=out/ckpt.pt --start=FILE:prompt.txt --temperature=0 --max_new_tokens=100
    python sample.py --init_from=out --prompts=prompts.txt --num_samples=1  # one prompt a line, one batch
    python sample.py --init_from=SmolLM2-135M/ --start="The capital of France"  # a Hugging Face folder
    python sample.py --init_from=SmolLM2-135M-Instruct/ --chat=True --start="What is the capital of France?"

Generation uses a KV cache under the paper's SM-I inference: every position keeps the pseudo mass it
had at the training length, so a cached step computes exactly what a full forward pass would. Past
block_size each new token attends to the last block_size tokens, a length the model was trained at
(a cache that drops its oldest entry); --sliding_window=False keeps the whole context instead.
Prompts of different lengths (--prompts) decode as one batch, left-padded: each row has positions of
its own and gives what it would alone, and each sample is written after its own prompt.
Ctrl-C stops it: the text generated so far is written, then one line, and it exits with 130.
"""

import signal
import sys

import torch

from checkpoint import load_model, missing_tokenizer
from configurator import autocast_for, configure_script, fail, resolve_device
from tokenizer import TokenizerError, chat_prompt, tokenizer_from_meta

# -----------------------------------------------------------------------------
init_from = 'out'  # a checkpoint file, a folder holding ckpt.pt, or a Hugging Face LLaMA-family folder
tokenizer = ''  # where the Hugging Face tokenizer of a fine-tuned checkpoint is now, if it has moved
start = "\n"  # the prompt; FILE:path reads it from a file. Empty: the end-of-text token (GPT-2 BPE)
prompts = ''  # a file of prompts, one a line (empty lines skipped), in place of start: all in one batch
num_samples = 3  # of each prompt, all generated together as one batch
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
chat = False  # the prompt as a user's message in a Hugging Face chat template; stops at the end of its turn
show_special = False  # write special tokens (<|endoftext|>, <|im_start|>, ...) in the text
# -----------------------------------------------------------------------------
RULES = dict(num_samples='>0', max_new_tokens='>=0', temperature='>=0', top_k='>0', top_p='>0, <=1',
             dtype=('auto', 'float32', 'bfloat16', 'float16'),
             attn_impl=('auto', 'triton', 'sdpa', 'reference'))
configure_script(globals(), sys.argv[1:], nullable=('top_k',), rules=RULES)


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
dtype, autocast = autocast_for(device, dtype)
torch.manual_seed(seed)
meta = checkpoint.get('meta')
if not meta:
    fail(missing_tokenizer(init_from))
model.eval().to(device)
# the forward generation calls, with a fixed-shape cache: a graph for the prompt, one for each decode step
if compile:
    model.forward = torch.compile(model.forward)
    if use_cache:
        use_cache = 'fixed'

# the prompts' texts, each with where it comes from for an error line
if prompts:
    try:
        with open(prompts, encoding='utf-8') as f:
            lines = f.read().split('\n')
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read the prompts file {prompts}: {e}")
    texts = [(f"line {n} of {prompts}", line) for n, line in enumerate(lines, 1) if line]
    if not texts:
        fail(f"the prompts file {prompts} holds no prompt (one a line)")
else:
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read the prompt file {start[5:]}: {e}")
    texts = [('the prompt', start)]
if chat:
    if meta['tokenizer'] != 'hf':
        fail(f"--chat=True formats the prompt with a Hugging Face model's chat template; "
             f"this model's tokenizer is {meta['tokenizer']}")
    try:
        texts = [(where, chat_prompt(tokenizer or meta['tokenizer_path'], text)) for where, text in texts]
    except ValueError as e:
        fail(e)
try:
    encode, decode = tokenizer_from_meta(meta, tokenizer or None, show_special)
except TokenizerError as e:
    fail(e)
starts, start_ids = [], []
for where, text in texts:
    try:
        ids = encode(text)
    except TokenizerError as e:
        fail(f"{where}: {e}")
    if not ids:
        if 'eot_token' not in meta:
            fail("the prompt is empty and this tokenizer has no end-of-text token to start from")
        ids = [meta['eot_token']]
    # a chat prompt as the text shows it: special tokens only with --show_special
    starts.append(decode(ids) if chat else text)
    start_ids.append(ids)

# one batch, each prompt num_samples times: a forward a step for all, prompts of any lengths left-padded
rows = [i for i in range(len(texts)) for _ in range(num_samples)]
x = [torch.tensor(start_ids[i], dtype=torch.long, device=device) for i in rows]
end = meta.get('eot_token') if chat else None  # a chat answer ends at the end of its turn
samples, done = [[] for _ in rows], [False] * len(rows)
# one sample streams: the tokens since the last line break, and how much of their text is written
line, shown = [], ''
if len(rows) == 1:
    sys.stdout.write(starts[0])
stopped = False


def stop_generating(signum, frame):
    """Ctrl-C while generating: the step ends and what was made is written (a second one stops at once)."""
    global stopped
    stopped = True
    signal.signal(signal.SIGINT, interrupted)


signal.signal(signal.SIGINT, stop_generating)
with torch.no_grad(), autocast:
    for step in model.generate_tokens(x, max_new_tokens, temperature, top_k, top_p, use_cache,
                                      sliding_window):
        for row, token in enumerate(step[:, 0].tolist()):
            if done[row] or (token == end and not show_special):
                done[row] = True
                continue
            done[row] = token == end
            samples[row].append(token)
            if len(rows) == 1:
                line.append(token)
                # decoded together: a token can hold part of a character, or a space for the next
                text = decode(line)
                if not text.endswith('\ufffd'):  # a character split across tokens waits for its last part
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    line, shown = ([], '') if text.endswith('\n') else (line, text)
        if all(done) or stopped:
            break
signal.signal(signal.SIGINT, interrupted)
if len(rows) == 1:
    sys.stdout.write(decode(line)[len(shown):] + '\n---------------\n')
else:
    for i, tokens in zip(rows, samples):
        sys.stdout.write(starts[i] + decode(tokens) + '\n---------------\n')
if stopped:
    sys.stdout.flush()  # the text first, then the line
    interrupted(what=f" after {max(map(len, samples))} new tokens")
