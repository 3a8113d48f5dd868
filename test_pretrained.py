"""Hugging Face LLaMA-family checkpoints (pretrained.py): small random models that transformers builds
and saves here (no download), loaded by checkpoint.from_pretrained and compared with transformers' own
logits; then the scripts on such a folder, with a tokenizer.json trained here."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import run_script
from checkpoint import from_pretrained, load_checkpoint

transformers = pytest.importorskip('transformers')  # test-only: requirements.txt
tokenizers = pytest.importorskip('tokenizers')

LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 32}
MODELS = {  # name: (architecture, config); each small, covering one thing the loader must map
    'llama-gqa-head-dim': ('Llama', dict(num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=32, rms_norm_eps=1e-5)),
    'llama3-rope-tied-mqa': ('Llama', dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
                                           rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    'llama-linear-rope': ('Llama', dict(num_attention_heads=2, num_key_value_heads=2,
                                        rope_scaling={'rope_type': 'linear', 'factor': 4.0})),
    'qwen2-biases': ('Qwen2', dict(num_attention_heads=4, num_key_value_heads=2,
                                   tie_word_embeddings=True, rope_theta=1e6)),
    'mistral': ('Mistral', dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
}


def save_model(folder, arch, vocab_size=97, dtype=torch.float32, shard=None, **config):
    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    max_position_embeddings=128, attn_implementation='eager', **config)
    model = getattr(transformers, f"{arch}ForCausalLM")(getattr(transformers, f"{arch}Config")(**settings))
    for name, p in model.named_parameters():  # biases start at zero: give them values, so a lost bias shows
        if name.endswith('bias'):
            p.data.normal_(0, 0.2)
    model = model.to(dtype).eval()
    model.save_pretrained(folder, **({'max_shard_size': shard} if shard else {}))
    return model


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def logits_of_both(hf, folder, idx, **overrides):
    ours = from_pretrained(str(folder), **overrides).eval()
    with torch.no_grad():
        return ours(idx, targets=idx)[0], hf.float()(idx).logits


@pytest.mark.parametrize('name', MODELS)
def test_logits_equal_transformers(tmp_path, name):
    arch, config = MODELS[name]
    hf = save_model(tmp_path, arch, **config)
    # past the original 32 positions
    idx = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(1))
    ours, theirs = logits_of_both(hf, tmp_path, idx, attn_mask='causal', attn_impl='sdpa')
    assert relative_error(ours, theirs) <= 1e-4
    for impl in ('reference', 'triton'):  # every attention path, grouped-query attention included
        assert relative_error(logits_of_both(hf, tmp_path, idx, attn_impl=impl)[0], theirs) <= 1e-4
    stable, _ = logits_of_both(hf, tmp_path, idx, attn_mask='stablemask')  # parameter-free: the same weights
    assert relative_error(stable, theirs) > 1e-3


def test_sharded_bf16_weights_and_the_older_config_form(tmp_path):
    """model.safetensors.index.json with several shards, bf16 weights (loaded as float32), and a
    config.json in the Hub's older form (rope_theta and rope_scaling, not rope_parameters)."""
    hf = save_model(tmp_path, 'Llama', dtype=torch.bfloat16, shard='40KB', num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    assert (os.path.exists(tmp_path / 'model.safetensors.index.json')
            and len(list(tmp_path.glob('*.safetensors'))) > 2)
    config = json.loads((tmp_path / 'config.json').read_text())
    rope = config.pop('rope_parameters')
    config.update(rope_theta=rope.pop('rope_theta'), rope_scaling=rope)
    (tmp_path / 'config.json').write_text(json.dumps(config))
    idx = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(2))
    ours, theirs = logits_of_both(hf, tmp_path, idx)
    assert relative_error(ours, theirs) <= 1e-4
    assert next(from_pretrained(str(tmp_path)).parameters()).dtype == torch.float32


@pytest.mark.parametrize('change,message', [
    (dict(architectures=['GPT2LMHeadModel']),
     'GPT2LMHeadModel is not supported (only LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)'),
    (dict(architectures=['MistralForCausalLM'], sliding_window=16),
     'a sliding window of 16 is not supported'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 2.0, 'rope_theta': 10000.0}),
     'rope_type=yarn is not supported'),
    (dict(attention_bias=True), 'attention_bias=True is not supported'),
    (dict(hidden_act='gelu'), 'hidden_act=gelu is not supported'),
])
def test_unsupported_configurations_are_refused(tmp_path, change, message):
    save_model(tmp_path, 'Llama', num_attention_heads=2)
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=re.escape(message)):
        from_pretrained(str(tmp_path))
    result = run_script('sample.py', f'--init_from={tmp_path}', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and result.stderr.strip().count('\n') == 0 and message in result.stderr


def test_pickled_weights_are_refused(tmp_path):
    save_model(tmp_path, 'Llama', num_attention_heads=2)
    (tmp_path / 'model.safetensors').rename(tmp_path / 'pytorch_model.bin')
    with pytest.raises(ValueError, match='only a pickled pytorch_model.bin, '
                                         'refused as loading it could run code'):
        from_pretrained(str(tmp_path))


def edit_json(path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def drop_tensor(path, name):
    from safetensors.torch import load_file, save_file
    weights = load_file(path)
    del weights[name]
    save_file(weights, path, metadata={'format': 'pt'})


def break_folder(folder, fault):
    """One fault in a folder saved by save_model; returns the error's start, after the folder's name."""
    config, weights = folder / 'config.json', folder / 'model.safetensors'
    if fault == 'config.json without a field':
        edit_json(config, lambda c: c.pop('hidden_size'))
        return '/config.json has no hidden_size'
    if fault == 'a field of the wrong type':
        edit_json(config, lambda c: c.update(num_attention_heads='2'))
        return "/config.json: num_attention_heads='2', expected a positive whole number"
    if fault == 'config.json not JSON':
        config.write_text('{"vocab_size": 97,')
        return '/config.json is not valid JSON: '
    if fault == 'config.json not an object':
        config.write_text('[1, 2]')
        return '/config.json holds a JSON list, not an object'
    if fault == 'a truncated safetensors file':
        weights.write_bytes(weights.read_bytes()[:5000])
        return '/model.safetensors is not a whole safetensors file (cut short, or damaged): '
    if fault == 'a shape other than config.json says':
        edit_json(config, lambda c: c.update(intermediate_size=80))
        return ('/model.safetensors: model.layers.0.mlp.up_proj.weight is [96, 64], '
                'the model of config.json needs [80, 64]')
    if fault == 'a layer missing':
        edit_json(config, lambda c: c.update(num_hidden_layers=3))
        return ': no tensor in its safetensors files for transformer.h.2.ln_1.weight'
    drop_tensor(weights, 'model.layers.1.self_attn.q_proj.weight')
    return ': layer 1 has no self_attn.q_proj.weight beside its model.layers.1.self_attn.k_proj.weight'


@pytest.mark.parametrize('fault', ['config.json without a field', 'a field of the wrong type',
                                   'config.json not JSON', 'config.json not an object',
                                   'a truncated safetensors file', 'a shape other than config.json says',
                                   'a layer missing', 'q_proj missing'])
def test_a_broken_folder_is_one_value_error_before_any_model(tmp_path, fault):
    """pretrained_args (what train.py --fsdp=True reads before each process reads its rows) checks the
    folder whole: each fault a ValueError, one line naming the file; the full load says the same."""
    folder = tmp_path / 'model'
    save_model(folder, 'Llama', num_attention_heads=2)
    message = break_folder(folder, fault)
    for weights in (False, True):
        with pytest.raises(ValueError) as e:
            load_checkpoint(str(folder), weights=weights)
        assert str(e.value).startswith(f'{folder}{message}') and '\n' not in str(e.value), str(e.value)


def test_a_broken_index_is_one_value_error(tmp_path):
    """model.safetensors.index.json: a shard it names that does not hold the tensor it names, or that
    is missing, or no weight_map at all."""
    from pretrained import pretrained_args
    save_model(tmp_path, 'Llama', num_attention_heads=2, shard='40KB')
    index = tmp_path / 'model.safetensors.index.json'
    weight_map = json.loads(index.read_text())['weight_map']
    shards = sorted(set(weight_map.values()))
    name = next(n for n, s in weight_map.items() if s == shards[0])
    for shard, message in ((shards[1], f'{index} puts {name} in {shards[1]}, which does not hold it'),
                           ('gone.safetensors', f'{index} names gone.safetensors, which is not in')):
        edit_json(index, lambda i: i['weight_map'].update({name: shard}))
        with pytest.raises(ValueError, match=re.escape(message)):
            pretrained_args(str(tmp_path))
    index.write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=re.escape(f'{index} has no weight_map of tensor names to files')):
        pretrained_args(str(tmp_path))


def test_a_tokenizer_file_that_is_not_one(tmp_path):
    from tokenizer import TokenizerError as PrepareError, hf_tokenizer
    (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
    message = f'{tmp_path}/tokenizer.json is not a tokenizer the tokenizers library reads: '
    with pytest.raises(PrepareError, match=re.escape(message)):
        hf_tokenizer(str(tmp_path))

# ---------------------------------------------------------------------------------------------------
# the scripts on a Hugging Face folder: prepare_data.py, train.py, sample.py, experiments.py


def train_tokenizer(folder, vocab_size):
    """A byte-level BPE tokenizer.json (GPT-2's kind), trained on pydoc's text, with <|endoftext|>."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((topics[k] for k in sorted(topics)), trainer)
    tokenizer.save(str(folder / 'tokenizer.json'))
    return tokenizer


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A small random Llama with GQA and its own trained tokenizer.json, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp('work') / 'tiny-llama'
    folder.mkdir()
    tokenizer = train_tokenizer(folder, 400)
    save_model(folder, 'Llama', vocab_size=tokenizer.get_vocab_size(), num_attention_heads=4,
               num_key_value_heads=2, eos_token_id=tokenizer.token_to_id('<|endoftext|>'))
    return folder


def test_prepare_with_its_tokenizer(hf_folder, tmp_path):
    """--tokenizer=<folder>: its tokenizer.json on every document whole, then its end-of-sequence token."""
    docs = ['A first document, with ünïcode.\n' * 40, 'def f(x):\n    return x * 2\n' * 30,
            'ends without a newline']
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'docs.jsonl').write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
    (tmp_path / 'val.txt').write_text('held out ' * 50)
    run_script('prepare_data.py', '--input', tmp_path / 'in', '--val_input', tmp_path / 'val.txt',
               f'--tokenizer={hf_folder}', cwd=tmp_path)
    folder = tmp_path / 'data' / 'in_tiny-llama'
    meta = json.loads((folder / 'meta.json').read_text())
    assert (meta['tokenizer'] == 'hf' and meta['tokenizer_path'] == str(hf_folder)
            and meta['vocab_size'] == 400)
    tokenizer = tokenizers.Tokenizer.from_file(str(hf_folder / 'tokenizer.json'))
    eos = tokenizer.token_to_id('<|endoftext|>')
    expected = [t for d in docs for t in tokenizer.encode(d, add_special_tokens=False).ids + [eos]]
    assert np.fromfile(folder / 'train.bin', dtype=meta['dtype']).tolist() == expected


def test_end_of_sequence_from_tokenizer_config(hf_folder, tmp_path):
    """Without eos_token_id in config.json, tokenizer_config.json's eos_token names the token that ends
    a document: the same for the dataset prepare_data.py writes and for the folder's checkpoint."""
    folder = tmp_path / 'no-eos-id'
    shutil.copytree(hf_folder, folder)
    config = json.loads((folder / 'config.json').read_text())
    eos = config.pop('eos_token_id')
    (folder / 'config.json').write_text(json.dumps(config))
    from tokenizer import TokenizerError as PrepareError, hf_tokenizer_meta
    with pytest.raises(PrepareError, match='names no end-of-sequence token'):
        hf_tokenizer_meta(str(folder))
    (folder / 'tokenizer_config.json').write_text(json.dumps({'eos_token': {'content': '<|endoftext|>'}}))
    assert hf_tokenizer_meta(str(folder))['eot_token'] == eos
    assert load_checkpoint(str(folder))['meta']['eot_token'] == eos


@pytest.mark.slow
def test_fine_tune_with_stablemask_then_sample(hf_folder, tmp_path):
    # pydoc's text, with the model's tokenizer
    run_script('prepare_data.py', f'--tokenizer={hf_folder}', cwd=tmp_path)
    common = ['--block_size=64', '--batch_size=4', '--max_iters=6', '--eval_interval=6', '--eval_iters=2',
              '--device=cpu']
    result = run_script('train.py', f'--init_from={hf_folder}', '--dataset=pydoc_tiny-llama',
                        '--attn_mask=stablemask', '--out_dir=out-ft', *common, cwd=tmp_path)
    assert f'fine-tuning {hf_folder}' in result.stdout and 'stablemask attention' in result.stdout
    checkpoint = torch.load(tmp_path / 'out-ft' / 'ckpt.pt', weights_only=True)
    assert (checkpoint['model_args']['n_kv_head'] == 2
            and checkpoint['model_args']['attn_mask'] == 'stablemask')
    assert checkpoint['meta']['tokenizer_path'] == str(hf_folder)
    # the model folder itself, and the fine-tuned checkpoint, which finds the tokenizer where it was
    for init in (hf_folder, tmp_path / 'out-ft'):
        out = run_script('sample.py', f'--init_from={init}', '--start=The ', '--num_samples=1',
                         '--max_new_tokens=20', '--device=cpu', cwd=tmp_path).stdout
        assert out.startswith('The ') and out.endswith('\n---------------\n') and len(out) > 30
    # moved: one line says where to point it
    moved = tmp_path / 'moved'
    shutil.copytree(hf_folder, moved)
    checkpoint['meta']['tokenizer_path'] = str(tmp_path / 'gone')
    torch.save(checkpoint, tmp_path / 'out-ft' / 'ckpt.pt')
    result = run_script('sample.py', '--init_from=out-ft', cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'is not there now: pass --tokenizer=' in result.stderr
    run_script('sample.py', '--init_from=out-ft', f'--tokenizer={moved}', '--num_samples=1',
               '--max_new_tokens=5', '--device=cpu', cwd=tmp_path)
    # data of another tokenizer cannot fine-tune it
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    result = run_script('train.py', f'--init_from={hf_folder}', '--dataset=pydoc_char', '--out_dir=out-x',
                        *common, cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and ('was trained on the hf tokenizer but data/pydoc_char is tokenized '
                                       'with char' in result.stderr)


def test_sinks_pretrained_switched_and_fine_tuned(hf_folder, tmp_path):
    """experiments.py sinks --init_from: three states apart (pretrained, the mask switched with no
    update, fine-tuned), by layer, and a summary with each state's validation loss."""
    out = run_script('experiments.py', 'sinks', f'--init_from={hf_folder}', '--steps=3',
                     '--plot=False', cwd=tmp_path).stdout
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
            if line.startswith('| ') and line[2].isdigit()]
    assert len(rows) == 2  # one per layer
    for layer, *first, pseudo_switched, pseudo_tuned in rows:
        assert (all(0 <= float(f) <= 100 for f in first) and 0 < float(pseudo_switched) < 100
                and 0 < float(pseudo_tuned) < 100)
        # switched: some of the first token's share now goes to the pseudo columns
        assert float(first[1]) < float(first[0])
    assert re.search(r'training loss \d+\.\d+ at its first step, \d+\.\d+ at its last', out)
    summary = [line for line in out.splitlines() if line.startswith(('| pretrained', '| StableMask'))]
    assert len(summary) == 3 and all(float(line.split('|')[2]) > 0 for line in summary)


# ---------------------------------------------------------------------------------------------------
# a real trained model: SmolLM2-135M-Instruct (conftest.smollm2)


@pytest.fixture(scope='module')
def real(smollm2):
    """The real model's folder, transformers' model of it (fp32, sdpa) and its tokenizer."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32,
                                                           attn_implementation='sdpa').eval()
    return smollm2, hf, tokenizers.Tokenizer.from_file(os.path.join(smollm2, 'tokenizer.json'))


def real_text_ids(tokenizer, shakespeare_txt, n):
    return torch.tensor([tokenizer.encode(open(shakespeare_txt).read()[:4000],
                                          add_special_tokens=False).ids[:n]])


@pytest.mark.parametrize('impl,tolerance', [('sdpa', 0.0), ('reference', 1e-5), ('triton', 1e-5)])
def test_real_model_logits_equal_transformers(real, shakespeare_txt, impl, tolerance):
    """Our fp32 logits of 48 tokens of real text are transformers', on every attention path (bit for
    bit on sdpa, the path transformers takes too); the model is the GQA one the GGUF file holds."""
    folder, hf, tokenizer = real
    idx = real_text_ids(tokenizer, shakespeare_txt, 48)
    ours = from_pretrained(folder, attn_impl=impl).eval()
    assert ((ours.config.n_layer, ours.config.n_head, ours.config.n_kv_head, ours.config.tie_embeddings)
            == (30, 9, 3, True))
    with torch.no_grad():
        logits, theirs = ours(idx, targets=idx)[0], hf(idx).logits
    assert relative_error(logits, theirs) <= tolerance, relative_error(logits, theirs)


def test_real_model_greedy_generation_equals_transformers(real):
    """Greedy decoding through our KV cache gives transformers' tokens, and they are sensible English."""
    folder, hf, tokenizer = real
    prompt = torch.tensor([tokenizer.encode('The capital of France is', add_special_tokens=False).ids])
    ours = from_pretrained(folder).eval()
    mine = ours.generate(prompt, 30, temperature=0)[0, prompt.size(1):].tolist()
    theirs = hf.generate(prompt, max_new_tokens=30, do_sample=False)[0, prompt.size(1):].tolist()
    assert mine == theirs
    assert 'Paris' in tokenizer.decode(mine)


@pytest.mark.slow
def test_real_model_fine_tunes_into_stablemask_from_its_causal_loss(real, shakespeare_txt, tmp_path):
    """prepare_data.py with the model's tokenizer on one long document (cut where the tokenizer allows,
    so both splits have text), then a StableMask fine-tune with a mask warm-up: its first evaluation
    is the causal model's, to 1e-4, where the mask switched at once costs the real model; it trains,
    and its checkpoint chats."""
    folder, hf, tokenizer = real
    run_script('prepare_data.py', '--input', shakespeare_txt, f'--tokenizer={folder}',
               '--name=shakespeare', cwd=tmp_path)
    meta = json.loads((tmp_path / 'data' / 'shakespeare' / 'meta.json').read_text())
    assert meta['train_tokens'] > 5000 and meta['val_tokens'] > 500
    common = [f'--init_from={folder}', '--dataset=shakespeare', '--block_size=64', '--batch_size=2',
              '--eval_iters=2', '--device=cpu']
    step0 = re.compile(r'step 0: train loss [\d.]+, val loss ([\d.]+)')
    first_val = {}
    for name, mask in (('causal', 'causal'), ('abrupt', 'stablemask')):  # evaluations only: nothing written
        out = run_script('train.py', *common, f'--attn_mask={mask}', '--eval_only=True',
                         '--out_dir=out-eval', cwd=tmp_path).stdout
        first_val[name] = float(step0.search(out).group(1))
    run_script('train.py', *common, '--attn_mask=stablemask', '--mask_warmup_iters=3', '--max_iters=3',
               '--eval_interval=3', '--learning_rate=3e-5', '--warmup_iters=0', '--out_dir=out-warm',
               cwd=tmp_path, timeout=600)
    log = [json.loads(line) for line in (tmp_path / 'out-warm' / 'log.jsonl').read_text().splitlines()]
    assert abs(log[0]['val_loss'] - first_val['causal']) < 1e-4, (log[0], first_val)
    # the switch alone costs the real model
    assert first_val['abrupt'] > first_val['causal'] + 0.1, first_val
    assert ([r['iter'] for r in log if 'val_loss' in r] == [0, 3]
            and all(np.isfinite(r.get('loss', 0)) for r in log))
    assert not (tmp_path / 'out-eval').exists()


@pytest.mark.slow
def test_real_model_chats(real, tmp_path):
    """--chat=True puts the prompt in the folder's chat template (rendered in jinja2's sandbox) and the
    answer ends at the end of its turn; --show_special=True writes the template's tokens."""
    pytest.importorskip('jinja2')
    folder, hf, tokenizer = real
    args = [f'--init_from={folder}', '--chat=True', '--start=What is the capital of France?',
            '--num_samples=1', '--temperature=0', '--max_new_tokens=60', '--device=cpu']
    plain = run_script('sample.py', *args, cwd=tmp_path).stdout
    answer = plain.split('assistant\n', 1)[1].split('\n---------------\n')[0]
    # it stopped at the end of its turn
    assert 'Paris' in answer and len(answer) < 100 and '<|im_start|>' not in plain
    special = run_script('sample.py', *args, '--show_special=True', cwd=tmp_path).stdout
    assert (special.startswith('<|im_start|>system')
            and '<|im_start|>user\nWhat is the capital of France?<|im_end|>' in special)
    assert special.split('\n---------------\n')[0].endswith('<|im_end|>')


def test_real_tokenizer_cuts_a_long_document_exactly(real, shakespeare_txt):
    """One long document with SmolLM2's tokenizer is cut where GPT-2's BPE is (so the same text is
    held out), each cut checked, and its sections' tokens, joined, are the tokenizer's on the whole."""
    from corpus import sections
    from prepare_data import cut_rule
    from tokenizer import tokenizer_meta
    folder, hf, tokenizer = real
    text = open(shakespeare_txt).read()
    cut = list(sections([(text, True)], cut_rule(tokenizer_meta(folder))))
    assert len(cut) > 20 and [t for t, _ in cut] == [t for t, _ in sections([(text, True)], True)]
    ids = lambda t: tokenizer.encode(t, add_special_tokens=False).ids
    assert [i for t, _ in cut for i in ids(t)] == ids(text)
