"""
Text to token files for train.py, streamed: memory stays flat however large the corpus.

    python prepare_data.py                               # offline: the English help text in every Python
    python prepare_data.py shakespeare --tokenizer=char  # Tiny Shakespeare: downloaded, or --input a copy
    python prepare_data.py wikitext103                   # the paper's WikiText-103 (raw), a 190 MB download
    python prepare_data.py minipile                      # MiniPile's parquet (6 GB), or --input a local copy
    python prepare_data.py pile --input pile/train/ --val_input pile/val.jsonl.zst  # the Pile's files
    python prepare_data.py --input notes/ book.txt --name=mine   # your own files and folders

Inputs: .jsonl, .jsonl.gz, .jsonl.zst (a document per line, in its `text` field; --text_key names
another), .parquet (a `text` column), and any other file as one UTF-8 document (corpus.py). A
malformed line or record is skipped, counted and reported at the end, and more than --max_malformed
of them stops the run. zstandard and pyarrow are needed only for their formats.

Writes data/<name>/train.bin and val.bin (token ids, uint16, or uint32 for a vocabulary past 65536)
and meta.json, last (tokenizer, vocabulary size, token counts, the largest token id, the character
table for 'char'). One run at a time writes a folder: it holds data/<name>/prepare.lock (run_dir.hold),
and a second run there is refused; a full disk ends the run in one line, its unfinished files removed.
<name> is the source, with '_char' (or the model folder's name) added for other tokenizers than
GPT-2's. Tokenizers: 'gpt2', GPT-2's BPE through tiktoken (its 'r50k_base' is the same vocabulary in
one file, so an offline machine can load it from TIKTOKEN_CACHE_DIR), with <|endoftext|> after every
document; 'char', one token per character, with a newline after every document, its table from a
first pass over the text; or a Hugging Face model's folder: its tokenizer.json (pip install
tokenizers), with its end-of-sequence token after every document.

Validation: WikiText-103 and MiniPile keep their own splits, and --val_input gives one. Otherwise
each document is cut into sections (a document of up to 8k characters whole, a longer one in parts
of about 1k) and section i of the corpus is held out when a hash of i falls below --val_fraction
(corpus.held_out): no corpus size is needed in advance, and the same text is held out for every
tokenizer. A cut is made only where the tokenizer cannot join tokens across it: proven for GPT-2's
BPE and characters, checked at each place for a Hugging Face tokenizer (cut_rule).

Every core tokenizes (a process per core): the output is the same, byte for byte, for any --workers,
and equals, document by document, the tokenizer on the whole document. The work goes in chunks of
--chunk_chars characters; a run that is stopped or killed continues from its last finished chunk
when the same command runs again, and ends with the same bytes.
"""

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque

import numpy as np
from tqdm import tqdm

import run_dir
from corpus import CorpusError, Tally, documents, files_under, held_out, sections, text_document
from tokenizer import GPT2_EOT, TokenizerError, gpt2_encoding, hf_tokenizer, hf_tokenizer_meta

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
WIKITEXT103_URL = 'https://wikitext.smerity.com/wikitext-103-raw-v1.zip'
# the Hub's parquet listing
MINIPILE_LIST_URL = 'https://datasets-server.huggingface.co/parquet?dataset=JeanKaddour/minipile'
LOCK = 'prepare.lock'  # in the output folder: held while a run writes there


class PrepareError(Exception):
    """Bad input: reported as one line."""


# -----------------------------------------------------------------------------
# sources: each returns {'all': read} (held out by corpus.held_out) or {'train': read, 'val': read},
# read(tally) yielding (piece, last) for every document, and the files read, for resuming


def download(url, dest):
    """Fetch url to dest (kept, so a second run needs no network), atomically, with a progress bar."""
    if os.path.exists(dest):
        return dest
    folder = os.path.dirname(dest)
    made = []  # the folders made here, deepest first: removed again if the download fails
    parent = os.path.abspath(folder)
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            size = int(response.headers.get('Content-Length') or 0) or None
            with run_dir.atomic_file(dest) as f, tqdm(total=size, unit='B', unit_scale=True,
                                                      desc=f"download {os.path.basename(dest)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        for path in made:
            os.rmdir(path)
        reason = getattr(e, 'reason', e)
        raise PrepareError(f"cannot download {url} ({reason}); give a local copy with --input") from None
    return dest


def from_files(paths, text_key):
    return lambda tally: documents(paths, text_key, tally)


def load_pydoc(args, cache_dir):
    from pydoc_data.topics import topics  # the help() pages: ~460k characters of English, in every Python

    def read(tally):
        for name in sorted(topics):
            tally.documents += 1
            yield topics[name], True
    return {'all': read}, []


def load_shakespeare(args, cache_dir):
    path = (files_under(args.input[:1])[0] if args.input
            else download(SHAKESPEARE_URL, os.path.join(cache_dir, 'input.txt')))
    return {'all': from_files([path], args.text_key)}, [path]


def load_wikitext103(args, cache_dir):
    """WikiText-103 raw, with its own train and validation splits; --input takes the zip or its folder."""
    path = (args.input[0] if args.input
            else download(WIKITEXT103_URL, os.path.join(cache_dir, 'wikitext-103-raw-v1.zip')))
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file or folder")
    names = {'train': 'wiki.train.raw', 'val': 'wiki.valid.raw'}
    if os.path.isdir(path):
        return {split: from_files([os.path.join(path, name)], args.text_key)
                for split, name in names.items()}, [path]
    try:
        with zipfile.ZipFile(path) as archive:
            members = {os.path.basename(m): m for m in archive.namelist()}
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{path}: not the WikiText-103 zip or folder ({e})") from None
    missing = [name for name in names.values() if name not in members]
    if missing:
        raise PrepareError(f"{path}: no {', '.join(missing)} in the archive")

    def member(name):
        def read(tally):
            with zipfile.ZipFile(path) as archive, archive.open(members[name]) as f:
                yield from text_document(io.TextIOWrapper(f, encoding='utf-8', newline=''),
                                         f"{path}:{name}", tally)
        return read
    return {split: member(name) for split, name in names.items()}, [path]


def load_minipile(args, cache_dir):
    """MiniPile (Kaddour, 2023): a 1M-document, 6 GB subset of the Pile, as parquet, with its own
    validation split. --input: a local copy (files whose path says 'validation' are the validation
    split, 'test' ones are left out); else the files the Hugging Face Hub lists for it."""
    if args.input:
        found = [f for f in files_under(args.input) if f.endswith('.parquet')]
    else:
        try:
            with urllib.request.urlopen(MINIPILE_LIST_URL, timeout=30) as response:
                listing = json.load(response)['parquet_files']
        except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError, KeyError) as e:
            raise PrepareError(f"cannot list MiniPile's files at {MINIPILE_LIST_URL} ({e}); "
                               f"give a local copy with --input") from None
        found = [download(f['url'], os.path.join(cache_dir, 'download', f['split'], f['filename']))
                 for f in listing if f['split'] in ('train', 'validation')]
    val = [f for f in found if 'validation' in f]
    train = [f for f in found if 'validation' not in f
             and 'test' not in os.path.basename(os.path.dirname(f)) + os.path.basename(f)]
    if not train or not val:
        raise PrepareError(f"no MiniPile train and validation parquet files in "
                           f"{' '.join(args.input) or cache_dir}")
    return {'train': from_files(train, args.text_key), 'val': from_files(val, args.text_key)}, train + val


def load_files(args, cache_dir):
    """Your files (the 'files' source), or the Pile's .jsonl.zst (the 'pile' source); --val_input
    gives the validation split, else corpus.held_out chooses it."""
    if not args.input:
        raise PrepareError(f"the '{args.source}' source needs --input PATH...")
    train = files_under(args.input)
    if not args.val_input:
        return {'all': from_files(train, args.text_key)}, train
    val = files_under(args.val_input)
    return {'train': from_files(train, args.text_key), 'val': from_files(val, args.text_key)}, train + val


SOURCES = {'pydoc': load_pydoc, 'shakespeare': load_shakespeare, 'wikitext103': load_wikitext103,
           'minipile': load_minipile, 'pile': load_files, 'files': load_files}

# -----------------------------------------------------------------------------
# tokenizers: described by a meta.json, built from it in every process


def section_encoder(meta):
    """encode(text) -> token ids as a numpy array, and the token that ends a document."""
    if meta['tokenizer'] == 'gpt2':
        # encode_to_numpy with no special tokens is encode_ordinary, without a Python list
        enc = gpt2_encoding()
        return lambda text: enc.encode_to_numpy(text, disallowed_special=()), meta['eot_token']
    if meta['tokenizer'] == 'hf':
        tokenizer = hf_tokenizer(meta['tokenizer_path'], meta['tokenizer_sha256'])
        return lambda text: np.array(tokenizer.encode(text, add_special_tokens=False).ids,
                                     dtype=np.uint32), meta['eot_token']
    table = np.array([ord(c) for c in meta['chars']], dtype=np.uint32)  # sorted by code point

    def encode_chars(text):
        return np.searchsorted(table, np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32))
    return encode_chars, meta['chars'].index('\n')


_worker = {}  # each process's encoder, built once


def start_worker(meta):
    watch_parent()
    _worker['encode'], _worker['end'] = section_encoder(meta)
    _worker['dtype'] = np.dtype(meta['dtype'])


def watch_parent():
    """End this worker when its parent ends: after a kill -9 of prepare_data.py a pool's workers
    would otherwise go on with their chunks. On Linux the kernel sends the signal (PR_SET_PDEATHSIG),
    even while a tokenizer holds the GIL; elsewhere a thread looks for a new parent."""
    parent = os.getppid()
    try:
        import ctypes
        if ctypes.CDLL(None).prctl(1, signal.SIGKILL) == 0:  # 1: PR_SET_PDEATHSIG
            if os.getppid() != parent:  # it ended before the request was in place
                os._exit(1)
            return
    except (OSError, AttributeError):  # not Linux
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def encode_chunk(chunk):
    """{split: token bytes} of a chunk's sections, in order. The end token follows a document's last
    section."""
    encode, end = _worker['encode'], np.array([_worker['end']])
    out = {'train': [], 'val': []}
    for text, last, split in chunk:
        out[split].append(encode(text))
        if last:
            out[split].append(end)
    return {split: np.concatenate(ids).astype(_worker['dtype']).tobytes() if ids else b''
            for split, ids in out.items()}


def encoded_chunks(chunks, meta, workers):
    """encode_chunk of every chunk, in order, on `workers` processes with a few chunks in flight
    (Pool.imap would read the whole corpus ahead)."""
    if workers == 1:
        start_worker(meta)
        yield from map(encode_chunk, chunks)
        return
    with multiprocessing.Pool(workers, start_worker, (meta,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

# -----------------------------------------------------------------------------
# the run: chunks of sections, written in order, with a record of the last finished chunk


def cut_rule(meta):
    """How corpus.sections may cut long documents for this tokenizer. For GPT-2's BPE and characters:
    wherever its rule allows (proven). For a Hugging Face tokenizer: only where tokenizing the text on
    each side apart gives its tokens of the two together. A SentencePiece tokenizer that adds a space
    to the start of a text fails there, and its documents stay whole."""
    if meta['tokenizer'] != 'hf':
        return True
    tokenizer = hf_tokenizer(meta['tokenizer_path'], meta['tokenizer_sha256'])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    return lambda before, after: encode(before + after) == encode(before) + encode(after)


def chunks_of(splits, val_fraction, chunk_chars, tally, cut=True):
    """Lists of (section, last, split), about chunk_chars characters each, in reading order. The
    chunks depend only on the text, never on the number of processes. cut: cut_rule's."""
    chunk, size, index = [], 0, 0
    for name, read in splits.items():
        for text, last in sections(read(tally), cut):
            split = name if name != 'all' else 'val' if held_out(index, val_fraction) else 'train'
            index += 1
            tally.sections = index
            chunk.append((text, last, split))
            size += len(text)
            if size >= chunk_chars:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


def write_json(path, value):
    try:
        with run_dir.atomic_file(path, 'w') as f:
            f.write(json.dumps(value, indent=1))
    except OSError as e:
        raise PrepareError(cannot_write(path, e)) from None


def write_synced(f, data):
    """data to the end of the open file f, on disk before the progress record that vouches for it."""
    try:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    except OSError as e:
        raise PrepareError(cannot_write(f.name, e)) from None


def cannot_write(path, e):
    """The line for a write the disk refused (full, a quota, a size limit): the file, and the room left."""
    free = shutil.disk_usage(os.path.dirname(path) or '.').free
    return (f"cannot write {path}: {e.strerror or e} ({free / 2**20:,.1f} MiB free there); the unfinished "
            f"dataset is removed: free some space (or choose another --out_dir) and run the command again")


def fingerprint(source, files, meta, args):
    """What decides the output bytes. A record from another run, of other inputs or settings, is not
    continued."""
    stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if os.path.isfile(f)]
    what = [source, stats, meta, args.text_key, args.val_fraction, args.chunk_chars,
            sys.version if source == 'pydoc' else '']
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def prepare(source, inputs, tokenizer, name, out_dir='data', val_fraction=0.1, workers=None, val_inputs=(),
            text_key='text', chunk_chars=1 << 22, max_malformed=0.001):
    """Tokenize a source into out_dir/name; returns (that folder, meta). Raises PrepareError on bad input."""
    if source not in SOURCES:
        raise PrepareError(f"unknown source {source!r}; choose from {', '.join(SOURCES)} (or give --input)")
    if tokenizer not in ('gpt2', 'char') and not os.path.isfile(os.path.join(tokenizer, 'tokenizer.json')):
        raise PrepareError(f"unknown tokenizer {tokenizer!r}; "
                           f"choose gpt2, char, or a model folder holding a tokenizer.json")
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction={val_fraction}: expected a fraction between 0 and 1")
    if chunk_chars < 1 or not 0 <= max_malformed < 1 or (workers is not None and workers < 1):
        raise PrepareError("--chunk_chars and --workers must be positive, "
                           "--max_malformed a fraction below 1")
    if not name:
        name = (source if source != 'files'
                else os.path.splitext(os.path.basename(os.path.normpath(inputs[0])))[0])
        name += ('' if tokenizer == 'gpt2' else '_char' if tokenizer == 'char'
                 else '_' + os.path.basename(os.path.normpath(tokenizer)))
    dest = os.path.join(out_dir, name)
    args = argparse.Namespace(source=source, input=list(inputs), val_input=list(val_inputs),
                              text_key=text_key, val_fraction=val_fraction, chunk_chars=chunk_chars)
    try:
        lock, made, note = run_dir.hold(dest, LOCK, '--name or --out_dir')
    except OSError as e:
        raise PrepareError(f"cannot write to {dest}: {e.strerror or e}") from None
    except ValueError as e:  # another run writes there
        raise PrepareError(str(e)) from None
    if note:
        print(note)
    undo = ()  # what the run made, removed when it fails (an interruption keeps its chunks, to continue)
    try:
        splits, files = SOURCES[source](args, dest)
        return write_dataset(dest, splits, files, source, tokenizer, args,
                             workers or os.cpu_count() or 1, max_malformed)
    except (PrepareError, CorpusError, TokenizerError) as e:
        # bad input or a full disk: nothing stays behind
        for leftover in ('train.bin.part', 'val.bin.part', 'progress.json'):
            if os.path.exists(os.path.join(dest, leftover)):
                os.remove(os.path.join(dest, leftover))
        undo = made
        raise PrepareError(str(e)) from None
    finally:
        run_dir.release(lock, undo)


def write_dataset(dest, splits, files, source, tokenizer, args, workers, max_malformed):
    meta = dict(tokenizer=tokenizer, source=source)
    if tokenizer == 'gpt2':
        gpt2_encoding()  # fails here, in one line, rather than in every process
        meta.update(vocab_size=GPT2_EOT + 1, eot_token=GPT2_EOT)
    elif tokenizer != 'char':
        meta.update(hf_tokenizer_meta(tokenizer))
    else:  # the table first: a pass over the text
        chars = {'\n'}
        for read in splits.values():
            for piece, _ in tqdm(read(Tally()), desc='characters', unit=' pieces'):
                chars.update(piece)
        meta.update(vocab_size=len(chars), chars=sorted(chars))
    meta.update(dtype=np.dtype(np.uint16 if meta['vocab_size'] <= 1 << 16 else np.uint32).name)
    itemsize = np.dtype(meta['dtype']).itemsize

    os.makedirs(dest, exist_ok=True)
    progress_path = os.path.join(dest, 'progress.json')
    parts = {split: os.path.join(dest, f"{split}.bin.part") for split in ('train', 'val')}
    key = fingerprint(source, files, meta, args)
    try:
        with open(progress_path) as f:
            progress = json.load(f)
        complete = 'max_token_id' in progress and all(os.path.exists(p) for p in parts.values())
        if progress.get('fingerprint') != key or not complete:
            raise ValueError
    except (OSError, ValueError):
        progress = dict(fingerprint=key, chunks=0, train=0, val=0, max_token_id=-1)
    if progress['chunks']:
        print(f"continuing {dest} after chunk {progress['chunks']} (the same inputs and settings)")
    outputs = {}
    for split, path in parts.items():  # back to the last finished chunk: what came after it is redone
        outputs[split] = open(path, 'r+b' if progress['chunks'] else 'wb')
        outputs[split].truncate(progress[split])
        outputs[split].seek(progress[split])

    tally = Tally()
    total = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) or None
    bar = tqdm(total=total, unit='B', unit_scale=True, desc=f"tokenize {os.path.basename(dest)}")
    chunks = chunks_of(splits, args.val_fraction, args.chunk_chars, tally, cut_rule(meta))
    todo = (c for k, c in enumerate(chunks) if k >= progress['chunks'])
    with outputs['train'], outputs['val']:
        for encoded in encoded_chunks(todo, meta, workers):
            for split in ('train', 'val'):
                write_synced(outputs[split], encoded[split])
                progress[split] += len(encoded[split])
                if encoded[split]:  # the largest id, which readers check against the vocabulary
                    top = int(np.frombuffer(encoded[split], dtype=meta['dtype']).max())
                    progress['max_token_id'] = max(progress['max_token_id'], top)
            progress['chunks'] += 1
            write_json(progress_path, progress)  # after the tokens it vouches for are on disk
            bar.update(tally.bytes - bar.n)
            bar.set_postfix(docs=f"{tally.documents:,}",
                            tokens=f"{(progress['train'] + progress['val']) // itemsize:,}")
            check_malformed(tally, max_malformed, final=False)
    bar.close()

    check_malformed(tally, max_malformed, final=True)
    meta.update(train_tokens=progress['train'] // itemsize, val_tokens=progress['val'] // itemsize,
                max_token_id=progress['max_token_id'], documents=tally.documents, malformed=tally.malformed,
                malformed_first=tally.places)
    for split in ('train', 'val'):
        if meta[f"{split}_tokens"] < 2:
            why = (f" (the text made {tally.sections} section{'s' * (tally.sections != 1)}, "
                   f"of which --val_fraction={args.val_fraction} are held out: "
                   f"give more text, or a validation split with --val_input)"
                   if 'all' in splits and tally.sections else '')
            raise PrepareError(f"too little text: the {split} split has "
                               f"{meta[f'{split}_tokens']} tokens{why}")
    for split, path in parts.items():
        os.replace(path, os.path.join(dest, f"{split}.bin"))
    write_json(os.path.join(dest, 'meta.json'), meta)  # last: its token counts vouch for the .bin files
    os.remove(progress_path)
    return dest, meta


def check_malformed(tally, max_malformed, final):
    """Malformed records are skipped, up to a share of all of them; past it the run stops. It stops
    early, once a thousand are seen, rather than after reading terabytes of the wrong thing."""
    seen = tally.documents + tally.malformed
    if seen and tally.malformed / seen > max_malformed and (final or tally.malformed >= 1000):
        raise PrepareError(f"{tally.malformed:,} of {seen:,} records are malformed, more than "
                           f"--max_malformed={max_malformed} allows (first: {'; '.join(tally.places)})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', nargs='?',
                        help=f"one of {', '.join(SOURCES)} (default: pydoc, or files with --input)")
    parser.add_argument('--input', nargs='+', default=[], metavar='PATH',
                        help='local files or folders (or a local copy of the source)')
    parser.add_argument('--val_input', nargs='+', default=[], metavar='PATH',
                        help='files or folders of the validation split')
    parser.add_argument('--tokenizer', default='gpt2',
                        help="gpt2 (default), char, or a Hugging Face model's folder (its tokenizer.json)")
    parser.add_argument('--name', help='the folder under --out_dir (default: the source, plus _char)')
    parser.add_argument('--out_dir', default='data')
    parser.add_argument('--val_fraction', type=float, default=0.1,
                        help='the share of sections held out (sources without a split of their own)')
    parser.add_argument('--text_key', default='text',
                        help='the field (jsonl) or column (parquet) that holds the text')
    parser.add_argument('--workers', type=int, default=None,
                        help='tokenizer processes (default: one per core)')
    parser.add_argument('--chunk_chars', type=int, default=1 << 22,
                        help='characters per unit of work, and of resumption')
    parser.add_argument('--max_malformed', type=float, default=0.001,
                        help='the share of malformed records tolerated')
    parser.error = lambda message: sys.exit(f"prepare_data.py: error: {message}")
    args = parser.parse_args(argv)
    # train.py's --dataset names a folder under out_dir, nothing outside it
    if args.name is not None and (os.path.basename(args.name) != args.name or args.name in ('', '.', '..')):
        parser.error(f"--name={args.name}: a folder's name under --out_dir, not a path")
    source = args.source or ('files' if args.input else 'pydoc')
    try:
        dest, meta = prepare(source, args.input, args.tokenizer, args.name, args.out_dir,
                             args.val_fraction, args.workers, args.val_input, args.text_key,
                             args.chunk_chars, args.max_malformed)
    except PrepareError as e:
        sys.exit(f"prepare_data.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare_data.py: interrupted; the same command continues from the last finished chunk")
    total = meta['train_tokens'] + meta['val_tokens']
    skipped = (f"; {meta['malformed']:,} malformed records skipped "
               f"(first: {'; '.join(meta['malformed_first'])})" if meta['malformed'] else '')
    print(f"{dest}: {meta['documents']:,} documents, {meta['train_tokens']:,} train and "
          f"{meta['val_tokens']:,} val tokens ({100 * meta['val_tokens'] / total:.1f}% held out), "
          f"{meta['tokenizer']} vocabulary of {meta['vocab_size']:,}{skipped}")


if __name__ == '__main__':
    main()
