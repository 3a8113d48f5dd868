"""prepare_data.py and corpus.py: every input format, the validation rule, exact tokens whatever the
number of processes, resuming after kill -9, one run at a time in a folder, a full disk, token ids
checked against the vocabulary, flat memory, and token files past 2^32 tokens."""

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import corpus
import prepare_data
from bench import peak_memory
from conftest import REPO, run_script
from corpus import CorpusError, held_out, random_starts, random_windows, read_dataset, read_windows, sections
from prepare_data import PrepareError, prepare
from tokenizer import tokenizer_from_meta


def error_line(result):
    """The one error line a failed run ends with (progress bars may stand above it), and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert 'Traceback' not in result.stderr and sum('error' in line for line in lines) == 1, result.stderr
    assert lines[-1].startswith('prepare_data.py: error: ')
    return lines[-1]


def pydoc_documents():
    from pydoc_data.topics import topics
    return [topics[name] for name in sorted(topics)]


def load_tokens(folder):
    with open(os.path.join(folder, 'meta.json')) as f:
        meta = json.load(f)
    return meta, {s: np.fromfile(os.path.join(folder, f"{s}.bin"), dtype=meta['dtype'])
                  for s in ('train', 'val')}


def decode(meta, ids):
    return tokenizer_from_meta(meta)[1]([int(i) for i in ids])


def expected_splits(docs, encode, end, val_fraction=0.1):
    """The documented rule, spelled out: each document's sections, section i held out when
    corpus.held_out(i) says so, each encoded alone, the end token after a document's last section."""
    out, index = {'train': [], 'val': []}, 0
    for doc in docs:
        for text, last in sections([(doc, True)]):
            split = 'val' if held_out(index, val_fraction) else 'train'
            out[split] += encode(text) + ([end] if last else [])
            index += 1
    return out


def write_documents(folder, docs, fmt, key='text'):
    """docs in one format: one .txt file each, or one .jsonl / .jsonl.gz / .jsonl.zst / .parquet file."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == 'txt':
        for i, doc in enumerate(docs):
            (folder / f"{i:05d}.txt").write_text(doc, encoding='utf-8')
        return folder
    path = folder / f"docs.{fmt}"
    if fmt == 'parquet':
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({key: docs, 'meta': list(range(len(docs)))}), path, row_group_size=7)
        return path
    lines = b''.join(json.dumps({key: doc, 'meta': {'n': i}}).encode() + b'\n' for i, doc in enumerate(docs))
    if fmt == 'jsonl.gz':
        lines = gzip.compress(lines)
    elif fmt == 'jsonl.zst':
        import zstandard
        lines = zstandard.ZstdCompressor().compress(lines)
    path.write_bytes(lines)
    return path


def generated_corpus(n_docs, seed=0):
    """Documents of English-like text of varied length (pydoc's, shuffled and numbered)."""
    rng = np.random.default_rng(seed)
    base = pydoc_documents()
    return [f"{i}. {base[j][:int(rng.integers(200, 6000))]}"
            for i, j in enumerate(rng.integers(0, len(base), n_docs))]

# ---------------------------------------------------------------------------------------------------
# tokens: exact, and the same for every tokenizer's hold-out and every number of processes


def test_offline_default_char(tmp_path):
    run_script('prepare_data.py', '--tokenizer=char', cwd=tmp_path)
    meta, ids = load_tokens(tmp_path / 'data' / 'pydoc_char')
    assert (meta['tokenizer'] == 'char' and meta['dtype'] == 'uint16'
            and meta['vocab_size'] == len(meta['chars']))
    docs = pydoc_documents()
    assert meta['documents'] == len(docs)
    encode, _ = tokenizer_from_meta(meta)
    expected = expected_splits(docs, encode, meta['chars'].index('\n'))
    assert {s: ids[s].tolist() for s in ids} == expected
    assert 0.05 < len(ids['val']) / (len(ids['train']) + len(ids['val'])) < 0.15


def test_offline_default_gpt2(tmp_path, gpt2_offline):
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    result = run_script('prepare_data.py', cwd=tmp_path)
    meta, ids = load_tokens(tmp_path / 'data' / 'pydoc')
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot_token']) == ('gpt2', 50257, 50256)
    assert ({s: ids[s].tolist() for s in ids}
            == expected_splits(pydoc_documents(), enc.encode_ordinary, 50256))
    assert f"{meta['documents']:,} documents" in result.stdout and '% held out' in result.stdout


def test_the_same_text_is_held_out_for_every_tokenizer(tmp_path, gpt2_offline):
    texts = {}
    for tokenizer, name in (('gpt2', 'pydoc'), ('char', 'pydoc_char')):
        run_script('prepare_data.py', f'--tokenizer={tokenizer}', cwd=tmp_path)
        meta, ids = load_tokens(tmp_path / 'data' / name)
        texts[tokenizer] = {split: decode(meta, ids[split]) for split in ids}
    for split in ('train', 'val'):  # <|endoftext|> where the character tokenizer puts a newline
        assert texts['gpt2'][split].replace('<|endoftext|>', '\n') == texts['char'][split]


ODD_TEXTS = ["no newline at all " * 300, "a\r\nb\r\n\r\n  c   d\t\te" * 200,
             "word\u00a0nbsp\u2003em  space\n" * 200, "don't we'll it's 123 4567 89\n\n\n" * 200,
             "x" * 5000 + " tail", "   leading spaces and trailing   " * 100,
             "emoji 😀😀 ünïcødé text — dashes… " * 200,
             "\n\n\n" + "tabs\t\t\tand\x0bvt\x0cff " * 150]


def test_sections_cut_where_bpe_agrees(gpt2_offline, monkeypatch):
    """Every cut falls before a space that follows a non-space, where GPT-2's pre-tokenizer always
    ends a piece: the sections of a document, each encoded alone, give the document's tokens."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    monkeypatch.setattr(corpus, 'SECTION_CHARS', 40)  # many cuts
    monkeypatch.setattr(corpus, 'WHOLE_CHARS', 100)
    for text in ['\n'.join(pydoc_documents())[:300_000], *ODD_TEXTS]:
        # read in odd pieces
        pieces = [(text[i:i + 977], i + 977 >= len(text)) for i in range(0, len(text), 977)]
        cut = list(sections(pieces))
        assert (''.join(t for t, _ in cut) == text
                and [last for _, last in cut] == [False] * (len(cut) - 1) + [True])
        assert len(cut) > 10 or 'x' * 5000 in text  # a run without spaces is never cut
        assert [t for s, _ in cut for t in enc.encode_ordinary(s)] == enc.encode_ordinary(text)


def test_sections_cut_only_where_a_check_allows():
    """A tokenizer without a proof (prepare_data.cut_rule: a Hugging Face one) has each place checked,
    with text on both sides: where the check fails there is no cut, and after corpus.CHECK_TRIES
    failures in a row the rest of the document stays whole. The text is all there, in order."""
    text = max(pydoc_documents(), key=len)
    proven = list(sections([(text, True)], True))
    assert len(proven) > 10 and list(sections([(text, True)], lambda before, after: True)) == proven
    assert list(sections([(text, True)], lambda before, after: False)) == [(text, True)]
    asked, refused = [], proven[1][0][:4]  # where the proven rule cuts first: the check refuses such places

    def check(before, after):
        asked.append((len(before), len(after)))
        return not after.startswith(refused)
    cut = list(sections([(text, True)], check))
    assert ''.join(t for t, _ in cut) == text and len(cut) > 10
    assert not any(t.startswith(refused) for t, _ in cut[1:]) and cut != proven
    assert max(asked) == (corpus.CHECK_CHARS, corpus.CHECK_CHARS)


def test_every_format_gives_the_same_tokens(tmp_path, gpt2_offline):
    """.txt files, .jsonl, .jsonl.gz, .jsonl.zst and .parquet of the same documents give the same token
    files, and each document's tokens are GPT-2's on the whole document, then <|endoftext|>."""
    import tiktoken
    enc = tiktoken.get_encoding('r50k_base')
    docs = generated_corpus(60) + ODD_TEXTS
    val = write_documents(tmp_path / 'val', ['held out text, ' * 50], 'jsonl')
    outputs = {}
    for fmt in ('txt', 'jsonl', 'jsonl.gz', 'jsonl.zst', 'parquet'):
        source = write_documents(tmp_path / fmt.replace('.', '_'), docs, fmt)
        dest, meta = prepare('files', [str(source)], 'gpt2', f"ds_{fmt}", out_dir=str(tmp_path / 'data'),
                             val_inputs=[str(val)], chunk_chars=20_000)
        assert meta['documents'] == len(docs) + 1 and meta['malformed'] == 0
        outputs[fmt] = {s: (tmp_path / 'data' / f"ds_{fmt}" / f"{s}.bin").read_bytes()
                        for s in ('train', 'val')}
    assert all(out == outputs['txt'] for out in outputs.values())
    train = np.frombuffer(outputs['jsonl']['train'], dtype=np.uint16).tolist()
    assert train == [t for doc in docs for t in enc.encode_ordinary(doc) + [50256]]


def test_text_key_and_folders_of_mixed_files(tmp_path):
    write_documents(tmp_path / 'mixed', ['first document\n' * 30], 'jsonl', key='content')
    (tmp_path / 'mixed' / 'notes.txt').write_text('a plain text file ' * 40)
    (tmp_path / 'mixed' / '.hidden').write_text('skipped')
    dest, meta = prepare('files', [str(tmp_path / 'mixed')], 'char', 'mixed',
                         out_dir=str(tmp_path / 'data'), text_key='content')
    assert meta['documents'] == 2
    _, ids = load_tokens(dest)
    text = decode(meta, np.concatenate([ids['train'], ids['val']]))
    assert sorted(text) == sorted('first document\n' * 30 + '\n' + 'a plain text file ' * 40 + '\n')


def test_malformed_records_are_counted_then_refused(tmp_path):
    good = [json.dumps({'text': f"document {i} " * 20}) for i in range(3000)]
    bad = ['{"text": "unfinished', '["a list"]', '{"title": "no text"}', '{"text": 42}']
    lines = good[:1000] + bad[:2] + good[1000:2000] + bad[2:] + good[2000:]
    path = tmp_path / 'in.jsonl'
    path.write_bytes(('\n'.join(lines) + '\n').encode() + b'{"text": "\xff\xfe not utf-8"}\n')
    result = run_script('prepare_data.py', '--input', path, '--tokenizer=char',
                        '--max_malformed=0.01', cwd=tmp_path)
    assert '5 malformed records skipped (first: ' in result.stdout
    assert ("in.jsonl line 1001: not JSON; " in result.stdout
            and "in.jsonl line 1002: no 'text' string; " in result.stdout)
    meta, _ = load_tokens(tmp_path / 'data' / 'in_char')
    assert meta['documents'] == 3000 and meta['malformed'] == 5
    result = run_script('prepare_data.py', '--input', path, '--tokenizer=char', '--name=strict',
                        cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and error_line(result)
    assert ('5 of 3,005 records are malformed, more than --max_malformed=0.001 allows (first: '
            in result.stderr)
    assert 'in.jsonl line 1001: not JSON' in result.stderr
    assert not (tmp_path / 'data' / 'strict').exists()


@pytest.mark.parametrize('fmt', ['jsonl.zst', 'jsonl.gz'])
def test_a_truncated_compressed_file_is_an_error(tmp_path, fmt):
    """A compressed file cut short (a partial download) stops the run, naming the file and
    'truncated', wherever the cut falls; never half a corpus and a skipped record. The Pile's .zst
    files hold several frames: a cut at a frame's end is the one place the data itself cannot
    tell, and the whole file reads back."""
    import zstandard
    docs = generated_corpus(2000, seed=3)
    lines = b''.join(json.dumps({'text': doc}).encode() + b'\n' for doc in docs)
    half = lines.index(b'\n', len(lines) // 2) + 1
    if fmt == 'jsonl.zst':  # two frames, as zstd's multi-threaded writer makes
        whole = (zstandard.ZstdCompressor().compress(lines[:half])
                 + zstandard.ZstdCompressor().compress(lines[half:]))
    else:
        whole = gzip.compress(lines)
    path = tmp_path / f'docs.{fmt}'
    path.write_bytes(whole)
    dest, meta = prepare('files', [str(path)], 'char', 'whole', out_dir=str(tmp_path / 'data'))
    assert meta['documents'] == len(docs) and meta['malformed'] == 0
    for cut in (len(whole) // 2, len(whole) - 5, 200):
        path.write_bytes(whole[:cut])
        result = run_script('prepare_data.py', '--input', path, '--tokenizer=char', f'--name=cut{cut}',
                            cwd=tmp_path, expect_ok=False)
        assert result.returncode == 1 and f'{path}: truncated' in error_line(result)
        assert not (tmp_path / 'data' / f'cut{cut}').exists()


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='finds the workers in /proc (Linux)')
def test_workers_end_with_their_parent(tmp_path):
    """A kill -9 of the process that owns the pool ends its workers at once, even one busy with a chunk
    (here a task that would sleep for a minute)."""
    script = tmp_path / 'pool.py'
    script.write_text(f"""import multiprocessing, sys, time
sys.path.insert(0, {REPO!r})
import prepare_data
with multiprocessing.Pool(2, prepare_data.watch_parent) as pool:
    pending = pool.map_async(time.sleep, [60, 60])
    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
    pending.get()
""")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(workers) == 2
    time.sleep(0.5)  # both asleep in their task
    proc.kill()
    proc.wait()
    deadline = time.time() + 5
    alive = workers
    while alive and time.time() < deadline:
        alive = [pid for pid in workers if os.path.exists(f'/proc/{pid}') and
                 open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0] != 'Z']
        time.sleep(0.05)
    assert not alive, 'workers outlived their parent'


def test_optional_packages_are_named_when_missing(tmp_path, monkeypatch):
    (tmp_path / 'a.jsonl.zst').write_bytes(b'')
    (tmp_path / 'b.parquet').write_bytes(b'')
    for name, package in (('a.jsonl.zst', 'zstandard'), ('b.parquet', 'pyarrow.parquet')):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, package, None)  # import fails as if it were not installed
            with pytest.raises(PrepareError, match=f"needs the {package.split('.')[0]} package: "
                                                   f"pip install {package.split('.')[0]}"):
                prepare('files', [str(tmp_path / name)], 'char', 'x', out_dir=str(tmp_path / 'data'))
    assert not (tmp_path / 'data' / 'x').exists()


def test_validation_rule():
    """Deterministic, about val_fraction of sections, and no corpus size needed."""
    picks = [held_out(i, 0.1) for i in range(100_000)]
    assert picks == [held_out(i, 0.1) for i in range(100_000)]
    assert abs(sum(picks) / len(picks) - 0.1) < 0.005
    assert all(held_out(i, 0.2) for i in range(100_000) if picks[i])  # a larger share holds out a superset


def test_identical_bytes_for_any_number_of_processes(tmp_path):
    path = write_documents(tmp_path / 'in', generated_corpus(300), 'jsonl')
    files = []
    for workers in (1, 2, 3):
        dest, _ = prepare('files', [str(path)], 'char', f"w{workers}", out_dir=str(tmp_path / 'data'),
                          workers=workers, chunk_chars=30_000)
        files.append([(tmp_path / 'data' / f"w{workers}" / f"{s}.bin").read_bytes()
                      for s in ('train', 'val')])
    assert files[0] == files[1] == files[2] and len(files[0][0]) > 100_000

# ---------------------------------------------------------------------------------------------------
# stopped, killed, resumed; the dataset that was there before


def test_interrupted_run_continues_and_ends_with_the_same_bytes(tmp_path, monkeypatch):
    path = write_documents(tmp_path / 'in', generated_corpus(200), 'jsonl')
    whole, _ = prepare('files', [str(path)], 'char', 'whole', out_dir=str(tmp_path / 'data'),
                       chunk_chars=20_000, workers=2)
    written = []
    real = prepare_data.write_json

    def stop_after_three_chunks(file, value):
        real(file, value)
        written.append(value)
        if len(written) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(prepare_data, 'write_json', stop_after_three_chunks)
    with pytest.raises(KeyboardInterrupt):
        prepare('files', [str(path)], 'char', 'part', out_dir=str(tmp_path / 'data'),
                chunk_chars=20_000, workers=2)
    monkeypatch.setattr(prepare_data, 'write_json', real)
    part = tmp_path / 'data' / 'part'
    assert sorted(p.name for p in part.iterdir()) == ['prepare.lock', 'progress.json', 'train.bin.part',
                                                      'val.bin.part']
    assert json.loads((part / 'progress.json').read_text())['chunks'] == 3
    (part / 'train.bin.part').open('ab').write(b'half a chunk written when it stopped')
    calls = []
    monkeypatch.setattr(prepare_data, 'encode_chunk',
                        lambda chunk, real=prepare_data.encode_chunk: calls.append(1) or real(chunk))
    prepare('files', [str(path)], 'char', 'part', out_dir=str(tmp_path / 'data'),
            chunk_chars=20_000, workers=1)
    for split in ('train', 'val'):
        assert ((part / f"{split}.bin").read_bytes()
                == (tmp_path / 'data' / 'whole' / f"{split}.bin").read_bytes())
    assert sorted(p.name for p in part.iterdir()) == ['meta.json', 'prepare.lock', 'train.bin', 'val.bin']
    assert (part / 'prepare.lock').read_text() == ''  # let go
    splits = {'all': prepare_data.from_files([str(path)], 'text')}
    # the first three kept
    assert len(calls) == sum(1 for _ in prepare_data.chunks_of(splits, 0.1, 20_000, corpus.Tally())) - 3


def test_kill_9_then_the_same_command_continues(tmp_path):
    path = write_documents(tmp_path / 'in', generated_corpus(6000, seed=1), 'jsonl')
    command = ['prepare_data.py', '--input', path, '--tokenizer=char', '--chunk_chars=50000', '--workers=1']
    run_script(*command, '--name=whole', cwd=tmp_path)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, command[0]), *map(str, command[1:]),
                             '--name=killed'],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / 'data' / 'killed' / 'progress.json'
    deadline = time.time() + 120
    while not (progress.exists() and json.loads(progress.read_text())['chunks'] >= 3):
        assert proc.poll() is None and time.time() < deadline, 'it finished before it could be killed'
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_script(*command, '--name=killed', cwd=tmp_path)
    assert 'continuing data/killed after chunk' in result.stdout
    assert f'data/killed: taking over from a run that ended without letting go of it (pid {proc.pid} on ' \
        in result.stdout
    for name in ('train.bin', 'val.bin', 'meta.json'):
        assert ((tmp_path / 'data' / 'killed' / name).read_bytes()
                == (tmp_path / 'data' / 'whole' / name).read_bytes())
    assert not progress.exists()


def test_changed_inputs_start_over(tmp_path, monkeypatch):
    path = write_documents(tmp_path / 'in', generated_corpus(100), 'jsonl')
    monkeypatch.setattr(prepare_data, 'write_json', lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare('files', [str(path)], 'char', 'ds', out_dir=str(tmp_path / 'data'),
                chunk_chars=10_000, workers=1)
    monkeypatch.undo()
    # other text: the old chunks do not belong
    write_documents(tmp_path / 'in', generated_corpus(100, seed=5), 'jsonl')
    dest, meta = prepare('files', [str(path)], 'char', 'ds', out_dir=str(tmp_path / 'data'),
                         chunk_chars=10_000, workers=1)
    fresh, _ = prepare('files', [str(path)], 'char', 'fresh', out_dir=str(tmp_path / 'data'),
                       chunk_chars=10_000, workers=1)
    assert ((tmp_path / 'data' / 'ds' / 'train.bin').read_bytes()
            == (tmp_path / 'data' / 'fresh' / 'train.bin').read_bytes())


def test_interrupted_prepare_keeps_the_old_dataset(tmp_path, monkeypatch):
    (tmp_path / 'a.txt').write_text('old text, ' * 100)
    (tmp_path / 'b.txt').write_text('new words; ' * 300)
    (tmp_path / 'c.txt').write_text('the validation text ' * 30)
    dest, _ = prepare('files', [str(tmp_path / 'a.txt')], 'char', 'ds', out_dir=str(tmp_path / 'data'),
                      val_inputs=[str(tmp_path / 'c.txt')])
    before = {p.name: p.read_bytes() for p in (tmp_path / 'data' / 'ds').iterdir()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:  # while tokenizing: the old dataset is untouched
        m.setattr(prepare_data, 'encode_chunk', interrupt)
        with pytest.raises(KeyboardInterrupt):
            prepare('files', [str(tmp_path / 'b.txt')], 'char', 'ds', out_dir=str(tmp_path / 'data'),
                    workers=1, val_inputs=[str(tmp_path / 'c.txt')])
    assert ({p.name: p.read_bytes() for p in (tmp_path / 'data' / 'ds').iterdir() if p.name in before}
            == before)
    with monkeypatch.context() as m:  # while writing meta.json, the last file
        real = prepare_data.write_json
        m.setattr(prepare_data, 'write_json',
                  lambda path, value: interrupt() if path.endswith('meta.json') else real(path, value))
        with pytest.raises(KeyboardInterrupt):
            prepare('files', [str(tmp_path / 'b.txt')], 'char', 'ds', out_dir=str(tmp_path / 'data'),
                    val_inputs=[str(tmp_path / 'c.txt')])
    assert not [p for p in (tmp_path / 'data' / 'ds').iterdir() if '.tmp' in p.name]
    assert (tmp_path / 'data' / 'ds' / 'meta.json').read_bytes() == before['meta.json']
    # the .bin files were replaced whole but meta.json was not: train.py sees the mismatch and says so
    result = run_script('train.py', '--dataset=data/ds', '--block_size=8', '--max_iters=1',
                        cwd=tmp_path, expect_ok=False)
    assert result.returncode == 1 and 'rerun prepare_data.py' in result.stderr


def test_one_run_at_a_time_in_a_folder(tmp_path, gpt2_offline):
    """The fault of issue 25: two runs with one name and two tokenizers. The second is refused while
    the first writes there (one line naming it), and the first's dataset is whole and of one
    tokenizer; once it is done, the second runs."""
    path = write_documents(tmp_path / 'in', generated_corpus(6000, seed=3), 'jsonl')
    common = ['--input', str(path), '--name=same', '--chunk_chars=50000', '--workers=1']
    command = [sys.executable, os.path.join(REPO, 'prepare_data.py'), *common, '--tokenizer=char']
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    progress = tmp_path / 'data' / 'same' / 'progress.json'
    deadline = time.time() + 120
    while not progress.exists():
        assert first.poll() is None and time.time() < deadline, 'the first run ended before it wrote a chunk'
        time.sleep(0.01)
    second = run_script('prepare_data.py', *common, '--tokenizer=gpt2', cwd=tmp_path, expect_ok=False)
    assert second.returncode == 1 and error_line(second).startswith(
        f'prepare_data.py: error: data/same is in use by another run (pid {first.pid} on ')
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    meta = read_dataset(str(tmp_path / 'data' / 'same'))
    _, ids = load_tokens(tmp_path / 'data' / 'same')
    largest = max(ids['train'].max(), ids['val'].max())
    assert meta['tokenizer'] == 'char' and largest == meta['max_token_id'] < meta['vocab_size']
    run_script('prepare_data.py', *common, '--tokenizer=gpt2', cwd=tmp_path)
    meta, ids = load_tokens(tmp_path / 'data' / 'same')
    largest = max(ids['train'].max(), ids['val'].max())
    assert meta['tokenizer'] == 'gpt2' and largest == meta['max_token_id'] > 255


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A write the disk refuses (a file-size limit, ulimit -f: the refusal a full disk gives) ends the
    run in one line naming the file and the room there; its unfinished files are removed, and the
    folder it made with them."""
    limit = 100_000  # bytes: pydoc's text is about 900 kB of character ids
    command = [sys.executable, os.path.join(REPO, 'prepare_data.py'), '--tokenizer=char',
               '--chunk_chars=20000', '--workers=1']
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith('prepare_data.py: error: cannot write data/pydoc_char/train.bin.part: '
                           'File too large (')
    assert 'MiB free there); the unfinished dataset is removed' in line
    assert not (tmp_path / 'data').exists()

# ---------------------------------------------------------------------------------------------------
# token ids within the vocabulary: recorded when written, checked when read


def test_the_largest_token_id_is_recorded_and_checked(tmp_path):
    """meta.json records the largest token id; read_dataset refuses a meta.json whose vocabulary it
    passes, or whose numbers are of the wrong type, in one line; a dataset written before the largest
    id was recorded still loads."""
    dest, meta = prepare('pydoc', [], 'char', 'ds', out_dir=str(tmp_path / 'data'), workers=1)
    _, ids = load_tokens(dest)
    largest = max(ids['train'].max(), ids['val'].max())
    assert meta['max_token_id'] == largest == read_dataset(dest)['max_token_id']
    path = tmp_path / 'data' / 'ds' / 'meta.json'
    largest = f"its token ids reach {meta['max_token_id']} (max_token_id), past its vocab_size of 10"
    for change, message in ((dict(vocab_size=10), 'vocab_size is 10, but its character table has'),
                            (dict(vocab_size=10, chars=meta['chars'][:10]), largest),
                            (dict(vocab_size='76'), "vocab_size is '76', not a positive whole number"),
                            (dict(vocab_size=None), 'vocab_size is None, not a positive whole number'),
                            (dict(train_tokens=1.5), 'train_tokens is 1.5, not a whole number'),
                            (dict(dtype='int8'), "dtype is 'int8', not uint16 or uint32")):
        path.write_text(json.dumps({**meta, **change}))
        with pytest.raises(CorpusError) as e:
            read_dataset(dest)
        line = str(e.value)
        assert line.startswith(f'{dest}/meta.json: {message}') and '\n' not in line, line
    older = {k: v for k, v in meta.items() if k != 'max_token_id'}
    path.write_text(json.dumps(older))
    assert read_dataset(dest) == older


def test_windows_read_are_checked_against_the_vocabulary(tmp_path):
    """corpus.read_windows, given the vocabulary, refuses an id past it in what it read, naming the
    file (a dataset mixed from two tokenizers, or edited after meta.json was written)."""
    path = tmp_path / 'train.bin'
    ids = np.arange(100, dtype=np.uint16) % 50
    ids[70] = 50256
    ids.tofile(path)
    x, y = read_windows(str(path), 'uint16', 100, [0, 10], 8, vocab_size=50)
    assert x.max() < 50 and y.max() < 50
    with pytest.raises(CorpusError, match=f'{path} holds token id 50256, past the vocabulary of 50 in'):
        read_windows(str(path), 'uint16', 100, [0, 65], 8, vocab_size=50)

# ---------------------------------------------------------------------------------------------------
# memory, and token files past 2^32 tokens


@pytest.mark.skipif(not os.path.isdir('/proc'), reason='reads memory from /proc (Linux)')
def test_memory_stays_flat_as_the_input_doubles(tmp_path):
    docs = generated_corpus(9000, seed=2)
    write_documents(tmp_path / 'small', docs, 'jsonl')
    write_documents(tmp_path / 'large', docs * 2, 'jsonl')
    peaks = {}
    for name in ('small', 'large'):
        command = [sys.executable, os.path.join(REPO, 'prepare_data.py'), '--input',
                   str(tmp_path / name / 'docs.jsonl'), '--tokenizer=char', '--chunk_chars=100000',
                   '--workers=2', f'--name={name}']
        peaks[name] = peak_memory(command, tmp_path)[1]
    size = (tmp_path / 'small' / 'docs.jsonl').stat().st_size / 2 ** 20
    assert size > 15
    # reading it all would add the size, tokens more
    assert peaks['large'] - peaks['small'] < size / 3, (peaks, size)


def test_token_files_past_2_to_the_32(tmp_path):
    """train.py reads windows through corpus.random_windows, with int64 offsets: in a sparse file of
    2^32 + 2^20 uint32 tokens (17 GB on paper, a few pages on disk), ids past 65,536 at offsets past
    2^32 are read where they are, and random windows reach that far."""
    n, start = 2 ** 32 + 2 ** 20, 2 ** 32 + 1000
    path = tmp_path / 'train.bin'
    with open(path, 'wb') as f:
        f.truncate(n * 4)
        f.seek(start * 4)
        f.write(np.arange(70_000, 70_100, dtype=np.uint32).tobytes())
    x, y = read_windows(str(path), 'uint32', n, [start, 5, n - 9], 8)
    assert (x.dtype == np.int64 and x[0].tolist() == list(range(70_000, 70_008))
            and y[0].tolist() == list(range(70_001, 70_009)))
    assert x[1:].tolist() == [[0] * 8, [0] * 8]
    starts = random_starts(2 ** 34, 8, 4096, torch.Generator().manual_seed(0))
    assert sum(s > 2 ** 32 for s in starts) > 2000 and min(starts) >= 0 and max(starts) <= 2 ** 34 - 9
    x, y = random_windows(str(path), 'uint32', n, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8)

# ---------------------------------------------------------------------------------------------------
# the named sources, from local copies


def test_shakespeare_both_tokenizers(tmp_path, shakespeare_txt, gpt2_offline):
    import tiktoken
    text = open(shakespeare_txt, encoding='utf-8').read()
    for tokenizer, name in (('gpt2', 'shakespeare'), ('char', 'shakespeare_char')):
        run_script('prepare_data.py', 'shakespeare', '--input', shakespeare_txt,
                   f'--tokenizer={tokenizer}', cwd=tmp_path)
        meta, ids = load_tokens(tmp_path / 'data' / name)
        encode = (tiktoken.get_encoding('r50k_base').encode_ordinary if tokenizer == 'gpt2'
                  else tokenizer_from_meta(meta)[0])
        end = 50256 if tokenizer == 'gpt2' else meta['chars'].index('\n')
        assert {s: ids[s].tolist() for s in ids} == expected_splits([text], encode, end)
        # one document of 40 sections
        assert 0.03 < len(ids['val']) / (len(ids['train']) + len(ids['val'])) < 0.2


def test_folder_input(tmp_path):
    corpus_dir = tmp_path / 'notes'
    (corpus_dir / 'sub').mkdir(parents=True)
    (corpus_dir / 'b.txt').write_text('second file\n' * 20)
    (corpus_dir / 'a.txt').write_text('first file\n' * 20)
    (corpus_dir / 'sub' / 'c.md').write_text('nested ünïcode\n' * 20)
    (corpus_dir / '.hidden').write_text('skipped')
    result = run_script('prepare_data.py', '--input', corpus_dir, '--tokenizer=char', '--val_input',
                        corpus_dir / 'a.txt', cwd=tmp_path)
    assert 'data/notes_char' in result.stdout
    meta, ids = load_tokens(tmp_path / 'data' / 'notes_char')
    assert decode(meta, ids['train']) == ''.join(['first file\n' * 20 + '\n', 'second file\n' * 20 + '\n',
                                                  'nested ünïcode\n' * 20 + '\n'])
    # named like the text folder it came from: --dataset=notes means data/notes, not ./notes
    run_script('prepare_data.py', '--input', corpus_dir, '--tokenizer=char', '--name=notes', cwd=tmp_path)
    run_script('train.py', '--dataset=notes', '--block_size=16', '--batch_size=4', '--n_layer=1',
               '--max_iters=1', '--eval_iters=1', '--out_dir=out-notes', '--device=cpu', cwd=tmp_path)


def test_wikitext103_from_a_local_copy(tmp_path):
    """The paper's dataset keeps its own train and validation splits, from the zip or its folder."""
    import zipfile
    texts = {'train': ' = Valkyria = \n The game began in 2010 .\n' * 40,
             'valid': ' = Tower = \n It stands .\n' * 10}
    archive = tmp_path / 'wikitext-103-raw-v1.zip'
    with zipfile.ZipFile(archive, 'w') as z:
        for split, text in texts.items():
            z.writestr(f'wikitext-103-raw/wiki.{split}.raw', text)
        z.writestr('wikitext-103-raw/wiki.test.raw', 'unused')
    zipfile.ZipFile(archive).extractall(tmp_path)
    for source in (archive, tmp_path / 'wikitext-103-raw'):
        dest, meta = prepare('wikitext103', [str(source)], 'char', None, out_dir=str(tmp_path / 'data'))
        assert dest.endswith('wikitext103_char')
        for split, name in (('train', 'train'), ('val', 'valid')):
            ids = np.fromfile(os.path.join(dest, f'{split}.bin'), dtype=meta['dtype'])
            assert decode(meta, ids) == texts[name] + '\n'
    broken = tmp_path / 'broken.zip'
    with zipfile.ZipFile(broken, 'w') as z:
        z.writestr('wiki.train.raw', 'only a training split')
    with pytest.raises(PrepareError, match='no wiki.valid.raw'):
        prepare('wikitext103', [str(broken)], 'char', 'broken', out_dir=str(tmp_path / 'data'))


def test_minipile_and_pile_from_local_copies(tmp_path):
    """MiniPile: its parquet files, validation split by file name, test split left out. The Pile:
    .jsonl.zst files, --val_input its validation file."""
    copy = tmp_path / 'minipile' / 'data'
    write_documents(copy / 'train', generated_corpus(40), 'parquet')
    write_documents(copy / 'validation', ['validation text. ' * 30] * 3, 'parquet')
    write_documents(copy / 'test', ['QQQ test split, never read ' * 30], 'parquet')
    dest, meta = prepare('minipile', [str(tmp_path / 'minipile')], 'char', None,
                         out_dir=str(tmp_path / 'data'))
    assert dest.endswith('minipile_char') and meta['documents'] == 43
    _, ids = load_tokens(dest)
    assert decode(meta, ids['val']) == ('validation text. ' * 30 + '\n') * 3
    assert 'QQQ' not in decode(meta, ids['train'])
    pile = write_documents(tmp_path / 'pile' / 'train', generated_corpus(40), 'jsonl.zst')
    val = write_documents(tmp_path / 'pile' / 'val', ['pile validation. ' * 30], 'jsonl.zst')
    result = run_script('prepare_data.py', 'pile', '--input', pile, '--val_input', val,
                        '--tokenizer=char', cwd=tmp_path)
    meta, ids = load_tokens(tmp_path / 'data' / 'pile_char')
    assert decode(meta, ids['val']) == 'pile validation. ' * 30 + '\n' and '41 documents' in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--input', 'missing.txt'], 'missing.txt: no such file'),
    (['--input', 'empty.txt'], 'too little text'),
    (['--input', 'short.txt'],
     'split has 0 tokens (the text made 1 section, of which --val_fraction=0.1 are held out'),
    (['--input', 'binary.txt'], 'not UTF-8'),
    (['nosuchsource'], 'unknown source'),
    (['--tokenizer=bpe'], 'unknown tokenizer'),
    (['--val_fraction=1.5'], 'fraction'),
    (['shakespeare', '--input', 'missing.txt'], 'missing.txt: no such file'),
    (['pile'], "the 'pile' source needs --input"),
    (['--input', 'bad.parquet'], 'bad.parquet: not a parquet file'),
    (['--input', 'nokey.jsonl', '--text_key=body'], "no 'body' string"),
    (['--name=../../escape'], "--name=../../escape: a folder's name under --out_dir, not a path"),
])
def test_prepare_bad_input(tmp_path, args, message):
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'short.txt').write_text('a short note ' * 20)
    (tmp_path / 'binary.txt').write_bytes(bytes(range(128, 256)))
    (tmp_path / 'bad.parquet').write_bytes(b'not parquet at all')
    (tmp_path / 'nokey.jsonl').write_text('{"text": "a"}\n' * 5)
    # no GPT-2 vocabulary needed
    tokenizer = [] if any(a.startswith('--tokenizer') for a in args) else ['--tokenizer=char']
    result = run_script('prepare_data.py', *args, *tokenizer, cwd=tmp_path, expect_ok=False)
    assert result.returncode != 0 and message in error_line(result)
    assert not (tmp_path / 'data').exists() or not any((tmp_path / 'data').rglob('*'))


def test_download_without_network(tmp_path, monkeypatch):
    # nothing listens there
    monkeypatch.setattr(prepare_data, 'SHAKESPEARE_URL', 'http://127.0.0.1:9/input.txt')
    monkeypatch.setattr(prepare_data, 'MINIPILE_LIST_URL', 'http://127.0.0.1:9/parquet')
    for source in ('shakespeare', 'minipile'):
        with pytest.raises(PrepareError, match='give a local copy with --input'):
            prepare(source, [], 'char', None, out_dir=str(tmp_path / 'data'))
    assert not (tmp_path / 'data').exists()  # no empty folders left behind
