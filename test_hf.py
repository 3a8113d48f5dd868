"""Our models in Hugging Face transformers: export_hf.py's folders loaded by transformers (and read back
by --init_from), with the tokenizers they carry; stablemask_hf.register()'s attention on transformers'
own Llama; lm-evaluation-harness's hf model on an exported folder; and the light install. Small random
models built here, no download; the real model's tests are marked slow."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from checkpoint import from_pretrained, load_checkpoint, load_model
from conftest import REPO, run_command, run_script
from model import GPT, GPTConfig
from test_pretrained import relative_error, save_model, train_tokenizer
from tokenizer import tokenizer_from_meta, tokenizer_mismatch

transformers = pytest.importorskip('transformers')  # test-only: requirements-test.txt
pytest.importorskip('tokenizers')
import export_hf  # noqa: E402 (needs transformers)
import stablemask_hf  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\tAll: Speak! café 日本 😀\n"
CHAR_META = dict(tokenizer='char', chars=sorted(set(TEXT)), vocab_size=len(set(TEXT)))
TINY = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)
# what the exported code must reproduce: every position encoding, grouped-query attention, both sinks,
# the gate, our decays and offsets, biases; each with StableMask (or causal, where that is not Llama)
LLAMA3_ROPE = dict(rope_type='llama3', factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)
VARIANTS = {
    'rope': dict(),
    'alibi': dict(pos_enc='alibi'),
    'learned': dict(pos_enc='learned'),
    'none': dict(pos_enc='none'),
    'gqa-llama3-rope': dict(n_kv_head=2, rope_scaling=LLAMA3_ROPE),
    'sink-token-alibi': dict(pos_enc='alibi', sink_token='learned'),
    'fixed-sink-token-learned': dict(pos_enc='learned', sink_token='fixed'),
    'sink-logit-gqa': dict(sink_logit='learned', n_kv_head=1),
    'gate-bias': dict(attn_gate='elementwise', bias=True, tie_embeddings=True),
    'gamma-offset': dict(sm_gamma=0.05, sm_offset=-1.0),
    'causal-alibi-zero-sink': dict(attn_mask='causal', pos_enc='alibi', sink_logit='zero'),
}


def checkpoint_of(path, meta=CHAR_META, **settings):
    """A tiny random GPT saved as train.py saves it (ckpt.pt at path), its sinks, gates and biases given
    values so that a lost one shows. Returns the model."""
    args = {**TINY, 'vocab_size': meta.get('vocab_size'), **settings}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    for name, p in model.named_parameters():
        if 'sink' in name or 'gate' in name or name.endswith('bias'):
            p.data.normal_(0, 0.5)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model=model.state_dict(), model_args=args, meta=meta, iter_num=0), path)
    return model


def exported(tmp_path, name, meta=CHAR_META, **settings):
    """(the folder export_hf.py writes for a tiny model, the model)."""
    model = checkpoint_of(str(tmp_path / name / 'ckpt.pt'), meta, **settings)
    export_hf.export(str(tmp_path / name), str(tmp_path / f'hf-{name}'))
    return tmp_path / f'hf-{name}', model


def load_hf(folder, **kwargs):
    auto = transformers.AutoModelForCausalLM
    return auto.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


def hf_folder(folder, vocab_size):
    """A small random Llama with its own tokenizer.json and a tokenizer_config.json naming its end token,
    as a Hugging Face folder."""
    end = train_tokenizer(folder, vocab_size).token_to_id('<|endoftext|>')
    settings = dict(eos_token='<|endoftext|>', tokenizer_class='PreTrainedTokenizerFast')
    (folder / 'tokenizer_config.json').write_text(json.dumps(settings))
    save_model(folder, 'Llama', vocab_size=vocab_size, num_attention_heads=4, num_key_value_heads=2,
               eos_token_id=end)


def ids(n, vocab, rows=2, seed=1):
    return torch.randint(0, vocab, (rows, n), generator=torch.Generator().manual_seed(seed))


def left_padded(prompts, pad=0):
    """A batch of prompts (1-D tensors) padded on the left, and its attention mask."""
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    return batch, mask


def greedy(hf, prompt, n, attention_mask=None):
    """transformers' greedy continuation, n tokens a row; the mask given, as token 0 also pads."""
    mask = torch.ones_like(prompt) if attention_mask is None else attention_mask
    out = hf.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, prompt.size(1):].tolist()

# ---------------------------------------------------------------------------------------------------
# export_hf.py: a folder that transformers loads and that computes our model


@pytest.mark.parametrize('variant', VARIANTS)
def test_exported_folder_computes_our_model(tmp_path, variant):
    """AutoModelForCausalLM (trust_remote_code) on the folder: our logits, fp32, to 1e-5 (SM-I: the
    training length's pseudo mass); transformers' generate with its KV cache gives our greedy tokens;
    and a left-padded batch of prompts of different lengths gives each row its tokens alone."""
    folder, ours = exported(tmp_path, variant, **VARIANTS[variant])
    assert json.loads((folder / 'config.json').read_text())['architectures'] == ['StableMaskForCausalLM']
    hf = load_hf(folder, trust_remote_code=True)
    vocab, N = CHAR_META['vocab_size'], TINY['block_size']
    x = ids(N, vocab)
    with torch.no_grad():
        want = ours(x, targets=x, pseudo_len=N)[0]
        assert relative_error(hf(x).logits, want) <= 1e-5
    prompts = [x[0, :5], x[1, :12]]
    alone = [greedy(hf, p[None], 10)[0] for p in prompts]
    assert alone == [ours.generate(p[None], 10, temperature=0)[0, -10:].tolist() for p in prompts]
    batch, mask = left_padded(prompts)
    assert greedy(hf, batch, 10, attention_mask=mask) == alone


@pytest.mark.parametrize('variant', ['sink-logit-gqa', 'sink-token-alibi'])
def test_a_left_padded_batch_trains_as_its_rows_alone(tmp_path, variant):
    """Fine-tuning the exported model in transformers on a left-padded batch: the summed loss and every
    gradient (a learned sink logit's included) are those of each row alone, to 1e-5."""
    import torch.nn.functional as F
    folder, _ = exported(tmp_path, variant, **VARIANTS[variant])
    hf = load_hf(folder, trust_remote_code=True).train()
    x = ids(16, CHAR_META['vocab_size'])
    prompts = [x[0, :7], x[1]]

    def loss_and_gradients(batch, mask, rows):
        logits = hf(batch, attention_mask=mask).logits
        # each row's own tokens, each predicted from those before it
        loss = sum(F.cross_entropy(logits[r, -len(p):-1], p[1:], reduction='sum')
                   for r, p in enumerate(rows))
        hf.zero_grad()
        loss.backward()
        return loss.item(), {name: p.grad.clone() for name, p in hf.named_parameters()}
    (loss, grads), *alone = [loss_and_gradients(*left_padded(prompts), prompts),
                             *(loss_and_gradients(p[None], None, [p]) for p in prompts)]
    assert loss == pytest.approx(sum(each for each, _ in alone), rel=1e-5)
    for name, grad in grads.items():
        assert relative_error(grad, sum(each[name] for _, each in alone)) <= 1e-5, name


@pytest.mark.parametrize('variant', ['rope', 'sink-token-alibi', 'learned'])
def test_past_block_size_transformers_keeps_the_whole_context(tmp_path, variant):
    """Past block_size, transformers' generate attends to the whole context: our tokens with
    sliding_window=False (no pseudo mass past N); a learned-position model stops there, in one line."""
    folder, ours = exported(tmp_path, variant, **VARIANTS[variant])
    hf = load_hf(folder, trust_remote_code=True)
    prompt = ids(20, CHAR_META['vocab_size'], rows=1)
    if variant == 'learned':
        with pytest.raises(ValueError, match='position 32 is past the learned positions'):
            greedy(hf, prompt, 30)
        return
    want = ours.generate(prompt, 30, temperature=0, sliding_window=False)[:, 20:].tolist()
    assert greedy(hf, prompt, 30) == want


def test_what_the_models_refuse_is_one_line(tmp_path, llama):
    """inputs_embeds in an exported model; a padded batch continuing a cache several tokens at a time;
    attention dropout in the registered attention: each a ValueError of one line."""
    folder, _ = exported(tmp_path, 'rope')
    hf = load_hf(folder, trust_remote_code=True)
    x = ids(8, CHAR_META['vocab_size'])
    with pytest.raises(ValueError, match='takes input_ids'):
        hf(inputs_embeds=torch.zeros(2, 8, TINY['n_embd']))
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    cache = hf(x, attention_mask=mask, use_cache=True).cache
    with pytest.raises(ValueError, match='continues a cache one token at a time'):
        hf(x[:, :2], attention_mask=torch.cat([mask, torch.ones_like(x[:, :2])], 1), cache=cache)
    stablemask_hf.register()
    dropping = load_hf(llama, attn_implementation='stablemask', attention_dropout=0.1).train()
    with pytest.raises(ValueError, match='no attention dropout'):
        dropping(ids(8, 97))


def test_without_trust_remote_code_transformers_refuses(tmp_path):
    """A StableMask folder never loads as a causal model: transformers asks for trust_remote_code."""
    folder, _ = exported(tmp_path, 'alibi', pos_enc='alibi')
    with pytest.raises(ValueError, match='trust_remote_code=True'):
        transformers.AutoModelForCausalLM.from_pretrained(str(folder))


def test_the_folder_needs_nothing_of_this_repository(tmp_path):
    """The folder's code imports only torch, transformers and Python's own modules (relative imports
    aside), and runs in a Python that cannot see this repository: the same logits; the Triton kernel is
    a stub that refuses to load."""
    from transformers.dynamic_module_utils import get_imports
    folder, ours = exported(tmp_path, 'sink', pos_enc='alibi', sink_token='learned', sink_logit='learned')
    files = sorted(f for f in os.listdir(folder) if f.endswith('.py'))
    assert files == ['kv_cache.py', 'model.py', 'stablemask_hf.py', 'stablemask_kernel.py',
                     'stablemask_sdpa.py']
    for name in files:
        assert set(get_imports(folder / name)) <= {'torch', 'transformers', *sys.stdlib_module_names}, name
    assert 'raise ImportError' in (folder / 'stablemask_kernel.py').read_text()
    x = ids(20, CHAR_META['vocab_size'])
    (tmp_path / 'ids.json').write_text(json.dumps(x.tolist()))
    code = ("import json, sys, torch; from transformers import AutoModelForCausalLM as Auto; "
            "m = Auto.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32); "
            "print(json.dumps(m(torch.tensor(json.load(open(sys.argv[2])))).logits.tolist()))")
    # -I: no PYTHONPATH, no current folder on the path: this repository cannot be imported
    command = [sys.executable, '-I', '-c', code, str(folder), str(tmp_path / 'ids.json')]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    with torch.no_grad():
        want = ours(x, targets=x, pseudo_len=TINY['block_size'])[0]
    assert relative_error(torch.tensor(json.loads(result.stdout.splitlines()[-1])), want) <= 1e-5


@pytest.mark.parametrize('arch,settings', [
    ('LlamaForCausalLM', dict(n_kv_head=2, tie_embeddings=True,
                              rope_scaling=dict(rope_type='linear', factor=2.0))),
    ('Qwen2ForCausalLM', dict(n_kv_head=1, qkv_bias=True, rope_base=1e6)),
])
def test_a_causal_rope_model_is_a_plain_transformers_folder(tmp_path, arch, settings):
    """No sinks, gate or StableMask: transformers' own architecture, no code in the folder, loaded
    without trust_remote_code, our logits to 1e-5."""
    folder, ours = exported(tmp_path, arch, attn_mask='causal', **settings)
    assert json.loads((folder / 'config.json').read_text())['architectures'] == [arch]
    assert not [f for f in os.listdir(folder) if f.endswith('.py')]
    hf = load_hf(folder)
    assert type(hf).__name__ == arch
    x = ids(TINY['block_size'], CHAR_META['vocab_size'])
    with torch.no_grad():
        assert relative_error(hf(x).logits, ours(x, targets=x)[0]) <= 1e-5


@pytest.mark.parametrize('variant', ['sink-token-alibi', 'gate-bias', 'plain-llama'])
def test_the_folder_loads_back_with_init_from(tmp_path, variant):
    """--init_from=<the folder> (checkpoint.load_model, as every script): the original model, every
    setting (attn_mask, sm_gamma, pos_enc, sinks, gate, block_size) and weight the same, its logits
    bit for bit, and the same tokenizer description, so that it fine-tunes on the same data."""
    settings = VARIANTS.get(variant, dict(attn_mask='causal', n_kv_head=2))
    folder, _ = exported(tmp_path, variant, **settings)
    original, checkpoint = load_model(str(tmp_path / variant))
    back, again = load_model(str(folder))
    # the settings a plain Llama folder gives explicitly, which ours leaves to their rules
    block = lambda m: m.transformer.h[0]
    resolved = lambda m: {**dataclasses.asdict(m.config), 'n_hidden': block(m).mlp.c_fc.out_features,
                          'head_dim': block(m).attn.head_dim, 'n_kv_head': block(m).attn.n_kv_head}
    assert resolved(back) == resolved(original)
    state, want = back.state_dict(), original.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], v) for k, v in want.items())
    x = ids(TINY['block_size'], CHAR_META['vocab_size'])
    with torch.no_grad():
        assert torch.equal(back(x, targets=x)[0], original(x, targets=x)[0])
    assert tokenizer_mismatch(again['meta'], checkpoint['meta'], str(folder), 'data') is None


def test_a_model_tuned_in_transformers_saves_a_folder_both_load(tmp_path):
    """An exported model trained a step in transformers and saved with save_pretrained (which copies the
    folder's code): transformers loads the new folder, and so does --init_from, both with its new weights."""
    folder, _ = exported(tmp_path, 'gate', **VARIANTS['gate-bias'])
    hf = load_hf(folder, trust_remote_code=True).train()
    x = ids(TINY['block_size'], CHAR_META['vocab_size'])
    hf(x, labels=x).loss.backward()
    torch.optim.SGD(hf.parameters(), lr=0.1).step()
    hf.eval().save_pretrained(tmp_path / 'tuned')
    assert (tmp_path / 'tuned' / 'model.py').read_bytes() == (folder / 'model.py').read_bytes()
    back, _ = load_model(str(tmp_path / 'tuned'))
    with torch.no_grad():
        want = hf(x).logits
        assert torch.equal(load_hf(tmp_path / 'tuned', trust_remote_code=True)(x).logits, want)
        assert relative_error(back(x, targets=x, pseudo_len=TINY['block_size'])[0], want) <= 1e-5
        assert relative_error(load_hf(folder, trust_remote_code=True)(x).logits, want) > 1e-3


@pytest.mark.slow
def test_export_script(tmp_path):
    """export_hf.py as a user runs it: the folder (sharded past --max_shard_size), then one line and exit
    1 for a folder already there, a missing checkpoint, no --out_dir, a bad dtype; --overwrite=True
    replaces it (here with bf16 weights in one file); sample.py reads the folder back and writes what it
    writes for the checkpoint; nothing is left aside."""
    from safetensors import safe_open
    checkpoint_of(str(tmp_path / 'out' / 'ckpt.pt'), pos_enc='alibi', sink_logit='learned', n_embd=64)
    export = lambda *args, **kw: run_script('export_hf.py', '--init_from=out', '--out_dir=hf', *args,
                                            cwd=tmp_path, **kw)
    assert 'exported out/ckpt.pt to hf as StableMaskForCausalLM' in export('--max_shard_size=100KB').stdout
    index = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 1
    samples = [run_script('sample.py', f'--init_from={init}', '--start=First', '--num_samples=1',
                          '--temperature=0', '--max_new_tokens=40', '--device=cpu', cwd=tmp_path).stdout
               for init in ('out', 'hf')]
    assert samples[0] == samples[1] and samples[0].startswith('First')
    for args, message in (([], 'hf exists: pass --overwrite=True to replace it'),
                          (['--init_from=nowhere'], 'no checkpoint at nowhere'),
                          (['--out_dir='], '--out_dir=<folder> names the folder to write'),
                          (['--dtype=int8'], 'dtype')):
        result = export(*args, expect_ok=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr
    export('--overwrite=True', '--dtype=bfloat16')
    assert not (tmp_path / 'hf' / 'model.safetensors.index.json').exists()
    with safe_open(tmp_path / 'hf' / 'model.safetensors', 'pt') as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {'BF16'}
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']
    # the weights readable by whom the umask allows, as every other file (safetensors writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / 'hf').iterdir()} == {
        p.name: 0o666 & ~umask for p in (tmp_path / 'hf').iterdir()}


def test_overwrite_replaces_only_an_earlier_export(tmp_path, monkeypatch):
    """--overwrite=True never removes a run's folder, a file, or the folder it runs in."""
    checkpoint_of(str(tmp_path / 'out' / 'ckpt.pt'), n_embd=64)
    (tmp_path / 'run').mkdir()
    for name in ('ckpt.pt', 'log.jsonl', 'config.json'):
        (tmp_path / 'run' / name).write_text('mine')
    (tmp_path / 'notes.txt').write_text('mine')
    monkeypatch.chdir(tmp_path)
    for out_dir, message in (('run', 'not an earlier export (it holds ckpt.pt, log.jsonl)'),
                             ('notes.txt', 'is a file')):
        with pytest.raises(ValueError, match=re.escape(message)):
            export_hf.export('out', out_dir, overwrite=True)
    assert all((tmp_path / 'run' / name).read_text() == 'mine' for name in os.listdir(tmp_path / 'run'))
    assert (tmp_path / 'notes.txt').read_text() == 'mine'
    export_hf.export('out', 'hf')
    (tmp_path / 'hf' / 'config.json').write_text('{}')
    export_hf.export('out', 'hf', overwrite=True)
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())
    monkeypatch.chdir(tmp_path / 'hf')  # an earlier export, but the folder this command runs in
    with pytest.raises(ValueError, match='holds the current folder'):
        export_hf.export(str(tmp_path / 'out'), '.', overwrite=True)


def test_an_export_stopped_midway_loses_nothing(tmp_path):
    """SIGTERM while --overwrite=True writes: exit 130, one line, and the folder whole (the one before),
    nothing left aside. After a kill -9, the next run removes what the killed one was writing, and moves
    back a folder that it had moved aside to replace: then refuses to overwrite it unasked."""
    import signal
    import time
    checkpoint_of(str(tmp_path / 'out' / 'ckpt.pt'), n_layer=4, n_embd=256)
    export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    before = {p.name: p.read_bytes() for p in (tmp_path / 'hf').iterdir()}
    command = [sys.executable, os.path.join(REPO, 'export_hf.py'), '--init_from=out', '--out_dir=hf',
               '--overwrite=True']
    proc = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not list(tmp_path.glob('.hf.export*')):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate()[1]
    assert proc.returncode == 130 and stderr.strip().count('\n') == 0 and 'interrupted' in stderr, stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / 'hf').iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']
    # a kill -9 midway through the swap: the folder moved aside, the new one not yet in its place
    gone = subprocess.Popen(['true'])
    gone.wait()
    (tmp_path / 'hf').rename(tmp_path / f'.hf.export{gone.pid}.old')
    (tmp_path / f'.hf.export{gone.pid}').mkdir()
    with pytest.raises(ValueError, match='hf exists: pass --overwrite=True'):
        export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    assert {p.name: p.read_bytes() for p in (tmp_path / 'hf').iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ['hf', 'out']


def test_what_cannot_be_exported_is_one_line(tmp_path):
    """A checkpoint without a tokenizer description, and a Hugging Face tokenizer that has moved or
    changed, are refused before anything is written."""
    path = tmp_path / 'out' / 'ckpt.pt'
    checkpoint_of(str(path))
    checkpoint = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k != 'meta'}, path)
    with pytest.raises(ValueError, match='holds no tokenizer description'):
        export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    meta = dict(tokenizer='hf', tokenizer_path=str(tmp_path / 'gone'), tokenizer_sha256='0' * 64,
                eot_token=0)
    torch.save({**checkpoint, 'meta': meta}, path)
    moved = f"was at {tmp_path / 'gone'}, which has no tokenizer.json now: pass --tokenizer="
    with pytest.raises(ValueError, match=re.escape(moved)):
        export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    (tmp_path / 'gone').mkdir()
    train_tokenizer(tmp_path / 'gone', 300)
    with pytest.raises(ValueError, match='is another tokenizer than the one the model was trained with'):
        export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    assert sorted(os.listdir(tmp_path)) == ['gone', 'out']

# ---------------------------------------------------------------------------------------------------
# the tokenizer AutoTokenizer loads: ours, text for text


TEXTS = ['', ' ', 'Hello, world!', "it's we'll THEY'RE 'tis", '  two  spaces\n\n\ttab\r\nline  ',
         'numbers 1234567 3.14159 -42', 'café naïve Ωμέγα Привет 日本語 한국어 العربية',
         '😀👍🏽 🏳️‍🌈 e\u0301', 'literal <|endoftext|> in text',
         'def f(x):\n    return x ** 2  # comment\n', 'a' * 500 + ' ' * 7 + '!']


def test_gpt2_tokenizer_is_tiktokens(tmp_path, gpt2_offline):
    """GPT-2's BPE written from tiktoken's ranks: AutoTokenizer's ids are tiktoken's encode_ordinary
    (ours) on every text, Python's whole help text and random characters included (<|endoftext|>
    written in a text is text, as ours), and its text is tiktoken's decoding; <|endoftext|> ends."""
    import random
    from pydoc_data.topics import topics
    meta = dict(tokenizer='gpt2', eot_token=50256, vocab_size=50257)
    folder, _ = exported(tmp_path, 'gpt2', meta, n_layer=1, n_embd=16, attn_mask='causal')
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    encode, decode = tokenizer_from_meta(meta)
    rng = random.Random(0)
    character = lambda: rng.choice([rng.randrange(32, 127), rng.randrange(0xa0, 0x3000),
                                    rng.randrange(0x1f300, 0x1f700), 9, 10, 13, 32])
    noise = [''.join(chr(character()) for _ in range(400)) for _ in range(20)]
    for text in TEXTS + noise + [''.join(topics[k] for k in sorted(topics))]:
        assert tokenizer(text)['input_ids'] == encode(text), text[:80]
        assert tokenizer.decode(encode(text)) == decode(encode(text)) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 50256
    assert tokenizer.decode([50256]) == '<|endoftext|>'


def test_char_tokenizer_is_the_character_table(tmp_path):
    """A character table: AutoTokenizer's ids are ours on texts of its characters (spaces, tabs, line
    ends, accents, emoji), the text comes back whole, and a character not in the table is refused."""
    folder, _ = exported(tmp_path, 'char')
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    encode, decode = tokenizer_from_meta(CHAR_META)
    for text in (TEXT, TEXT[::-1], '\n\n  \t', '', '😀é日'):
        assert tokenizer(text)['input_ids'] == encode(text)
        assert tokenizer.decode(encode(text)) == text == decode(encode(text))
    with pytest.raises(Exception, match='UNK'):
        tokenizer('zebra')
    with pytest.raises(ValueError):
        encode('zebra')


def test_hf_tokenizer_is_the_one_it_was_fine_tuned_with(tmp_path):
    """A model fine-tuned from a Hugging Face folder: its tokenizer files, copied, so AutoTokenizer's ids
    are ours (without the special tokens transformers adds by default, which ours never adds)."""
    source = tmp_path / 'llama'
    source.mkdir()
    hf_folder(source, 300)
    meta = load_checkpoint(str(source))['meta']
    folder, _ = exported(tmp_path, 'tuned', meta, vocab_size=300)
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        assert (folder / name).read_bytes() == (source / name).read_bytes()
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    encode, _ = tokenizer_from_meta(meta)
    for text in TEXTS:
        assert theirs(text, add_special_tokens=False)['input_ids'] == encode(text), text
    assert theirs.eos_token_id == meta['eot_token']
    config = json.loads((folder / 'generation_config.json').read_text())
    assert config['eos_token_id'] == meta['eot_token']

# ---------------------------------------------------------------------------------------------------
# stablemask_hf.register(): StableMask in transformers' own models


def test_register_twice_registers_the_attention_and_its_mask():
    """Idempotent; a mask comes with the attention (without one, transformers would give it none)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    stablemask_hf.register()
    stablemask_hf.register()
    assert ALL_ATTENTION_FUNCTIONS['stablemask'] is stablemask_hf.stablemask_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS['stablemask'] is ALL_MASK_ATTENTION_FUNCTIONS['sdpa']


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
    """A small random Llama (grouped-query attention) as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp('llama')
    save_model(folder, 'Llama', num_attention_heads=4, num_key_value_heads=2)
    return folder


def stablemask_llama(folder, pseudo_len, gamma=None):
    stablemask_hf.register()
    hf = load_hf(folder, attn_implementation='stablemask')
    hf.config.stablemask_pseudo_len, hf.config.stablemask_gamma = pseudo_len, gamma
    return hf


@pytest.mark.parametrize('gamma', [None, 0.1])
def test_registered_attention_on_a_llama_is_ours(llama, gamma):
    """attn_implementation='stablemask' on transformers' Llama: the logits of our GPT of the folder with
    attn_mask='stablemask' (ALiBi-slope decays, or one gamma; SM-I's length from the config), to 1e-5,
    where the causal model's differ; generate with transformers' cache gives our greedy tokens, and a
    left-padded batch each row's tokens alone."""
    N = 64
    hf = stablemask_llama(llama, N, gamma)
    # random weights: no token ends a text
    hf.generation_config.eos_token_id = None
    ours = from_pretrained(str(llama), attn_mask='stablemask', block_size=N, sm_gamma=gamma).eval()
    x = ids(48, 97)
    with torch.no_grad():
        want = ours(x, targets=x, pseudo_len=N)[0]
        assert relative_error(hf(x).logits, want) <= 1e-5
        assert relative_error(load_hf(llama)(x).logits, want) > 1e-3
    prompts = [x[0, :6], x[1, :17]]
    alone = [greedy(hf, p[None], 12)[0] for p in prompts]
    assert alone == [ours.generate(p[None], 12, temperature=0)[0, -12:].tolist() for p in prompts]
    batch, mask = left_padded(prompts)
    assert greedy(hf, batch, 12, attention_mask=mask) == alone


def test_training_with_transformers_is_ours(llama):
    """A few AdamW steps on transformers' Llama with the stablemask attention: its loss and its
    gradients (every weight, q, k and v against our fused c_attn) are ours, to 1e-5, at every step,
    and the loss falls."""
    from pretrained import source_map
    N = 64
    hf = stablemask_llama(llama, N).train()
    ours = from_pretrained(str(llama), attn_mask='stablemask', block_size=N).train()
    sources = source_map([n for n, _ in hf.named_parameters()], dict(tie_embeddings=False), 'llama')
    optimizers = [torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0) for m in (hf, ours)]
    x = ids(41, 97, rows=4)
    losses = []
    for step in range(4):
        theirs = hf(x, labels=x).loss
        mine = ours(x[:, :-1], targets=x[:, 1:], pseudo_len=N)[1]
        theirs.backward()
        mine.backward()
        assert abs(theirs.item() - mine.item()) <= 1e-5 * mine.item()
        grads = dict(hf.named_parameters())
        for name, p in ours.named_parameters():
            assert relative_error(torch.cat([grads[n].grad for n in sources[name]]), p.grad) <= 1e-5, name
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(mine.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.slow
def test_real_model_with_the_registered_attention_is_ours(smollm2, shakespeare_txt):
    """SmolLM2-135M-Instruct (Llama, 9 query heads over 3 key/value heads) with
    attn_implementation='stablemask': the logits of GPT.from_pretrained(..., attn_mask='stablemask') on
    real text, fp32, to 1e-5, and transformers' greedy generation our tokens, to the end of its turn."""
    N = 256
    hf = stablemask_llama(smollm2, N)
    ours = from_pretrained(smollm2, attn_mask='stablemask', block_size=N).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    text = open(shakespeare_txt).read()[:2000]
    x = torch.tensor([tokenizer(text, add_special_tokens=False)['input_ids'][:64]])
    with torch.no_grad():
        assert relative_error(hf(x).logits, ours(x, targets=x, pseudo_len=N)[0]) <= 1e-5
    prompt = torch.tensor([tokenizer('The capital of France is', add_special_tokens=False)['input_ids']])
    # up to the end of its turn
    theirs = greedy(hf, prompt, 20)[0]
    assert theirs == ours.generate(prompt, 20, temperature=0)[0, prompt.size(1):].tolist()[:len(theirs)]
    # the mask switched with no fine-tuning: 'called the Eiffel tower.', then the end of the turn
    assert len(theirs) > 4 and theirs[-1] == tokenizer.eos_token_id

# ---------------------------------------------------------------------------------------------------
# lm-evaluation-harness through transformers


def test_lm_eval_hf_model_on_the_exported_folder_is_our_adapter(tmp_path):
    """lm_eval's own hf model (trust_remote_code) on the exported folder of a StableMask model gives the
    log-likelihoods, greedy flags, rolling log-likelihoods and generations of our adapter on its
    checkpoint, and the same accuracy on a local multiple-choice task."""
    pytest.importorskip('lm_eval')
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from harness import StableMaskLM, run_tasks
    from test_eval import TASK, requests
    source = tmp_path / 'llama'
    source.mkdir()
    hf_folder(source, 400)
    # a StableMask fine-tune of it, as train.py saves one
    model = from_pretrained(str(source), attn_mask='stablemask', block_size=64)
    meta = load_checkpoint(str(source))['meta']
    (tmp_path / 'out').mkdir()
    torch.save(dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), meta=meta),
               tmp_path / 'out' / 'ckpt.pt')
    export_hf.export(str(tmp_path / 'out'), str(tmp_path / 'hf'))
    theirs = HFLM(pretrained=str(tmp_path / 'hf'), trust_remote_code=True, device='cpu', batch_size=3,
                  dtype='float32', max_length=64)
    no_autocast = torch.autocast('cpu', enabled=False)
    ours = StableMaskLM(model.eval(), meta, 'cpu', no_autocast, 3)
    pairs = [('The function', ' returns a value'), ('x = ', '1'), ('', 'Lists are sequences'),
             ('A', ' B C D E F G H'), ('For loops iterate over the items of a sequence, ' * 6, 'in order.')]
    answer = lambda kind, arguments: [getattr(lm, kind)(requests(kind, arguments), disable_tqdm=True)
                                      for lm in (ours, theirs)]
    want, got = answer('loglikelihood', pairs)
    assert [flag for _, flag in got] == [flag for _, flag in want]
    assert all(abs(a - b) <= 1e-4 * abs(b) + 1e-4 for (a, _), (b, _) in zip(got, want)), (got, want)
    texts = [('Raise an exception when the argument is not a number. ' * 8,), ('short',)]
    want, got = answer('loglikelihood_rolling', texts)
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(got, want)), (got, want)
    prompts = [('def f(x):', dict(until=['\n\n'], max_gen_toks=10, do_sample=False)),
               ('The', dict(until=['.'], max_gen_toks=8, do_sample=False))]
    want, got = answer('generate_until', prompts)
    assert got == want and any(got)
    docs = [dict(question='Which keyword starts a loop', choices=[' for', ' if', ' def'], answer=0),
            dict(question='A function is defined with', choices=[' class', ' def', ' with'], answer=1),
            dict(question='Errors are raised with', choices=[' raise', ' try', ' pass'], answer=0)] * 2
    (tmp_path / 'tasks').mkdir()
    (tmp_path / 'questions.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (tmp_path / 'tasks' / 'local_choice.yaml').write_text(TASK.format(path=tmp_path / 'questions.jsonl'))
    tasks = str(tmp_path / 'tasks')
    mine = run_tasks(model, meta, ['local_choice'], 'cpu', no_autocast, batch_size=4, include_path=tasks,
                     quiet=True)['local_choice']
    hf = lm_eval.simple_evaluate(model=theirs, tasks=['local_choice'], batch_size=4, log_samples=False,
                                 bootstrap_iters=0, task_manager=TaskManager(include_path=tasks,
                                                                             include_defaults=False))
    hf = hf['results']['local_choice']
    assert mine['acc'][0] == pytest.approx(hf['acc,none'])
    assert mine['acc_norm'][0] == pytest.approx(hf['acc_norm,none'])

# ---------------------------------------------------------------------------------------------------
# a light install: the core runs the quickstart; the tests' own requirements apart


def requirement_names(path):
    """The package names a requirements file lists (its -r includes aside)."""
    names = []
    for line in open(path).read().splitlines():
        line = line.split('#')[0].strip()
        if line and not line.startswith('-'):
            names.append(re.match(r'[A-Za-z0-9_.-]+', line).group(0).lower())
    return names


def dependencies_of(names):
    """The distributions names need, theirs included, as installed here."""
    from importlib.metadata import PackageNotFoundError, distribution
    from packaging.requirements import Requirement
    todo, found = list(names), set()
    while todo:
        name = re.sub(r'[-_.]+', '-', todo.pop()).lower()
        if name in found:
            continue
        found.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        todo += [r.name for r in map(Requirement, requires)
                 if r.marker is None or r.marker.evaluate({'extra': ''})]
    return found


# a script run as if only some packages were installed: the others are not found (as a package that
# looks for an optional one sees it: importlib.util.find_spec gives None, an import fails)
WITHOUT = """import importlib.machinery, runpy, sys
find = importlib.machinery.PathFinder.find_spec
def find_installed(name, path=None, target=None):
    return None if name.split('.')[0] in {absent!r} else find(name, path, target)
importlib.machinery.PathFinder.find_spec = staticmethod(find_installed)
sys.path.insert(0, {repo!r})
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def test_the_quickstart_needs_only_the_core_requirements(tmp_path):
    """requirements.txt is the core (torch, triton, numpy, tiktoken, tqdm), and the quickstart's three
    scripts (prepare_data.py, train.py, sample.py; a short run) run where nothing else is installed
    but what the core needs; requirements-test.txt holds the rest; .ci/run runs the README's two set-up
    lines."""
    from importlib.metadata import packages_distributions
    core = ['torch', 'triton', 'numpy', 'tiktoken', 'tqdm']
    assert requirement_names(os.path.join(REPO, 'requirements.txt')) == core
    tests = requirement_names(os.path.join(REPO, 'requirements-test.txt'))
    assert {'pytest', 'transformers', 'lm_eval', 'safetensors', 'tokenizers'} <= set(tests)
    assert '-r requirements.txt' in open(os.path.join(REPO, 'requirements-test.txt')).read()
    needed = dependencies_of(core)
    absent = sorted(module for module, names in packages_distributions().items()
                    if not {re.sub(r'[-_.]+', '-', name).lower() for name in names} & needed)
    assert {'transformers', 'lm_eval', 'safetensors', 'tokenizers', 'pytest'} <= set(absent)
    config = os.path.join(REPO, 'config', 'train_pydoc_char.py')
    steps = [['prepare_data.py', '--tokenizer=char'],
             ['train.py', config, '--max_iters=2', '--eval_interval=2', '--eval_iters=1', '--device=cpu',
              f'--out_dir={tmp_path / "out"}'],
             ['sample.py', f'--init_from={tmp_path / "out"}', '--num_samples=1', '--max_new_tokens=5',
              '--device=cpu']]
    for script, *args in steps:
        code = WITHOUT.format(absent=absent, repo=REPO, argv=[os.path.join(REPO, script), *args])
        result = run_command([sys.executable, '-c', code], cwd=tmp_path)
        assert result.returncode == 0, (script, result.stderr[-2000:])
    readme, ci = (open(os.path.join(REPO, name)).read() for name in ('README.md', '.ci/run'))
    set_up = [line.strip() for line in readme.splitlines()
              if re.match(r'\s+pip install .*-r requirements(-test)?\.txt', line)]
    assert len(set_up) == 2 and all(line in ci.splitlines() for line in set_up), set_up
