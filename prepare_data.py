"""
Text to token files for train.py.

    python prepare_data.py                                # offline: the English help text that ships with Python
    python prepare_data.py shakespeare --tokenizer=char   # Tiny Shakespeare: downloaded, or --input a local copy
    python prepare_data.py wikitext103                    # the paper's WikiText-103 (raw), a 190 MB download
    python prepare_data.py --input notes/ book.txt --name=mine   # your own UTF-8 text files or folders

Writes data/<name>/train.bin and val.bin (token ids, uint16, or uint32 for a vocabulary past 65536)
and meta.json (tokenizer, vocabulary size, token counts, the character table for 'char'). <name> is
the source, with '_char' added for the character tokenizer. Tokenizers: 'gpt2', GPT-2's BPE through
tiktoken (its 'r50k_base' is the same vocabulary in one file, so an offline machine can load it from
TIKTOKEN_CACHE_DIR), and 'char', one token per character of the text.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import zipfile

import numpy as np
from tqdm import tqdm

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
WIKITEXT103_URL = 'https://wikitext.smerity.com/wikitext-103-raw-v1.zip'
GPT2_EOT = 50256  # <|endoftext|>, placed after every document


class PrepareError(Exception):
    """Bad input: reported as one line, and nothing is written."""


# -----------------------------------------------------------------------------
# sources: each returns {'all': [documents]} (split by val_fraction) or {'train': [...], 'val': [...]}


def read_text(path):
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise PrepareError(f"{path}: no such file or folder") from None
    except OSError as e:
        raise PrepareError(f"{path}: {e.strerror}") from None
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None


def files_under(paths):
    """The files named, and every non-hidden file under the folders named, in a stable order."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
                found += [os.path.join(root, f) for f in sorted(files) if not f.startswith('.')]
        elif os.path.exists(path):
            found.append(path)
        else:
            raise PrepareError(f"{path}: no such file or folder")
    if not found:
        raise PrepareError(f"no files under {' '.join(paths)}")
    return found


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
            with atomic_file(dest) as f, tqdm(total=size, unit='B', unit_scale=True, desc=f"download {os.path.basename(dest)}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        for path in made:
            os.rmdir(path)
        reason = getattr(e, 'reason', e)
        raise PrepareError(f"cannot download {url} ({reason}); give a local copy with --input") from None
    return dest


def load_pydoc(inputs, cache_dir):
    from pydoc_data.topics import topics  # the help() pages: ~460k characters of English, in every Python
    return {'all': [topics[name] for name in sorted(topics)]}


def load_shakespeare(inputs, cache_dir):
    path = inputs[0] if inputs else download(SHAKESPEARE_URL, os.path.join(cache_dir, 'input.txt'))
    return {'all': [read_text(path)]}


def load_wikitext103(inputs, cache_dir):
    """WikiText-103 raw, with its own train and validation splits; --input takes the zip or its folder."""
    path = inputs[0] if inputs else download(WIKITEXT103_URL, os.path.join(cache_dir, 'wikitext-103-raw-v1.zip'))
    if not os.path.exists(path):
        raise PrepareError(f"{path}: no such file or folder")
    names = {'train': 'wiki.train.raw', 'val': 'wiki.valid.raw'}
    if os.path.isdir(path):
        return {split: [read_text(os.path.join(path, name))] for split, name in names.items()}
    try:
        with zipfile.ZipFile(path) as archive:
            members = {os.path.basename(m): m for m in archive.namelist()}
            missing = [name for name in names.values() if name not in members]
            if missing:
                raise PrepareError(f"{path}: no {', '.join(missing)} in the archive")
            return {split: [archive.read(members[name]).decode('utf-8')] for split, name in names.items()}
    except zipfile.BadZipFile as e:
        raise PrepareError(f"{path}: not the WikiText-103 zip or folder ({e})") from None


def load_files(inputs, cache_dir):
    if not inputs:
        raise PrepareError("the 'files' source needs --input PATH...")
    return {'all': [read_text(path) for path in files_under(inputs)]}


SOURCES = {'pydoc': load_pydoc, 'shakespeare': load_shakespeare, 'wikitext103': load_wikitext103, 'files': load_files}

# -----------------------------------------------------------------------------
# tokenizers


def gpt2_encoding():
    import tiktoken
    try:
        return tiktoken.get_encoding('r50k_base')  # GPT-2's BPE vocabulary, from one cacheable file
    except Exception as e:  # tiktoken raises whatever its download raised
        raise PrepareError(f"cannot load the GPT-2 BPE (tiktoken r50k_base: {type(e).__name__}); offline, "
                           "set TIKTOKEN_CACHE_DIR to a folder that holds it") from None


def tokenizer_from_meta(meta):
    """(encode: str -> list of ids, token_bytes: id -> bytes) for the tokenizer a meta.json names."""
    if meta['tokenizer'] == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode_single_token_bytes
    chars = meta['chars']
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        unknown = sorted(set(text) - stoi.keys())
        if unknown:
            raise PrepareError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [stoi[c] for c in text]
    return encode, lambda i: chars[i].encode('utf-8')


def tokenizer_safe_chunks(text, size):
    """Cut text into pieces of about `size` characters that GPT-2's BPE encodes exactly as the whole:
    each cut falls after a lone newline between two non-space characters, where the pre-tokenizer
    always ends a piece. Lets big texts be encoded in parallel."""
    chunks, start = [], 0
    while len(text) - start > size:
        cut = text.find('\n', start + size)
        while cut != -1 and not (cut + 1 < len(text) and not text[cut - 1].isspace() and not text[cut + 1].isspace()):
            cut = text.find('\n', cut + 1)
        if cut == -1:
            break
        chunks.append(text[start:cut + 1])
        start = cut + 1
    chunks.append(text[start:])
    return chunks


def encode_gpt2(documents, workers, desc):
    enc = gpt2_encoding()
    pieces = []
    for doc in documents:
        chunks = tokenizer_safe_chunks(doc, 1 << 20)
        pieces += [(chunk, i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
    out = []
    with tqdm(total=sum(len(c) for c, _ in pieces), unit='char', unit_scale=True, desc=desc) as bar:
        for g in range(0, len(pieces), 4 * workers):
            group = pieces[g:g + 4 * workers]
            for ids, (chunk, doc_end) in zip(enc.encode_ordinary_batch([c for c, _ in group], num_threads=workers), group):
                out.append(np.array(ids + [GPT2_EOT] * doc_end, dtype=np.uint32))
                bar.update(len(chunk))
    return np.concatenate(out) if out else np.zeros(0, np.uint32)


def encode_chars(documents, chars):
    codes = np.frombuffer('\n'.join(documents).encode('utf-32-le'), dtype=np.uint32)
    table = np.array([ord(c) for c in chars], dtype=np.uint32)
    return np.searchsorted(table, codes).astype(np.uint32)  # chars are sorted by code point

# -----------------------------------------------------------------------------
# writing: every file goes to a temporary name and is renamed into place only when complete


class atomic_file:
    """open(path, 'wb') that leaves path untouched unless the with-block completes."""

    def __init__(self, path):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"

    def __enter__(self):
        self.f = open(self.tmp, 'wb')
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.remove(self.tmp)


def prepare(source, inputs, tokenizer, name, out_dir='data', val_fraction=0.1, workers=None):
    """Tokenize a source into out_dir/name; returns (that folder, meta). Raises PrepareError on bad input."""
    if source not in SOURCES:
        raise PrepareError(f"unknown source {source!r}; choose from {', '.join(SOURCES)} (or give --input)")
    if tokenizer not in ('gpt2', 'char'):
        raise PrepareError(f"unknown tokenizer {tokenizer!r}; choose gpt2 or char")
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction={val_fraction}: expected a fraction between 0 and 1")
    if not name:
        name = source if source != 'files' else os.path.splitext(os.path.basename(os.path.normpath(inputs[0])))[0]
        name += '_char' if tokenizer == 'char' else ''
    dest = os.path.join(out_dir, name)
    splits = SOURCES[source](inputs, dest)
    if not any(doc.strip() for docs in splits.values() for doc in docs):
        raise PrepareError(f"no text in the {source} source{': ' + ' '.join(inputs) if inputs else ''}")
    workers = workers or os.cpu_count() or 1

    meta = dict(tokenizer=tokenizer, source=source)
    if tokenizer == 'gpt2':
        tokens = {split: encode_gpt2(docs, workers, f"tokenize {split}") for split, docs in splits.items()}
        meta.update(vocab_size=GPT2_EOT + 1, eot_token=GPT2_EOT)
    else:
        chars = sorted(set(''.join(doc for docs in splits.values() for doc in docs)) | {'\n'})
        tokens = {split: encode_chars(docs, chars) for split, docs in splits.items()}
        meta.update(vocab_size=len(chars), chars=chars)
    if 'all' in tokens:
        n_train = int(len(tokens['all']) * (1 - val_fraction))
        tokens = {'train': tokens['all'][:n_train], 'val': tokens['all'][n_train:]}
    for split, ids in tokens.items():
        if len(ids) < 2:
            raise PrepareError(f"too little text: the {split} split has {len(ids)} tokens")

    dtype = np.uint16 if meta['vocab_size'] <= 1 << 16 else np.uint32
    meta.update(dtype=np.dtype(dtype).name, train_tokens=len(tokens['train']), val_tokens=len(tokens['val']))
    os.makedirs(dest, exist_ok=True)
    for split, ids in tokens.items():
        with atomic_file(os.path.join(dest, f"{split}.bin")) as f:
            f.write(ids.astype(dtype).tobytes())
    with atomic_file(os.path.join(dest, 'meta.json')) as f:  # last: its token counts vouch for the .bin files
        f.write(json.dumps(meta, indent=1).encode())
    return dest, meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', nargs='?', help=f"one of {', '.join(SOURCES)} (default: pydoc, or files with --input)")
    parser.add_argument('--input', nargs='+', default=[], metavar='PATH', help='local text files or folders (or a local copy of the source)')
    parser.add_argument('--tokenizer', default='gpt2', help='gpt2 (default) or char')
    parser.add_argument('--name', help='the folder under --out_dir (default: the source, plus _char)')
    parser.add_argument('--out_dir', default='data')
    parser.add_argument('--val_fraction', type=float, default=0.1, help='the share of tokens held out (sources without a split of their own)')
    parser.add_argument('--workers', type=int, default=None, help='tokenizer threads (default: every core)')
    parser.error = lambda message: sys.exit(f"prepare_data.py: error: {message}")
    args = parser.parse_args(argv)
    source = args.source or ('files' if args.input else 'pydoc')
    try:
        dest, meta = prepare(source, args.input, args.tokenizer, args.name, args.out_dir, args.val_fraction, args.workers)
    except PrepareError as e:
        sys.exit(f"prepare_data.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare_data.py: interrupted; nothing was written")
    print(f"{dest}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"{meta['tokenizer']} vocabulary of {meta['vocab_size']:,}")


if __name__ == '__main__':
    main()
