"""
Text corpora, streamed: the documents prepare_data.py tokenizes, and the token windows train.py reads.

Formats, by file name: .jsonl, .jsonl.gz and .jsonl.zst hold one JSON object per line with the
document in its `text` field (or another key); .parquet a `text` column; any other file is one UTF-8
document. Nothing is read whole: text comes in pieces, jsonl a line at a time, parquet a batch of
rows at a time. A malformed line or record (not JSON, no text field, not a string, not UTF-8) is
counted and skipped; the caller decides how many it accepts. zstandard and pyarrow are imported only
for their formats.

Documents are cut into sections: a document of up to WHOLE_CHARS characters is one section; a
longer one (a book, or Tiny Shakespeare) is cut near every SECTION_CHARS characters, just before a
white-space character that follows a non-space one. GPT-2's BPE never joins a token across such a
place, so the sections of a document, tokenized apart, give exactly the document's tokens; another
tokenizer (a Hugging Face tokenizer.json) has each such place checked (its tokens of the text on
both sides, apart, are its tokens of the two together), and a place that fails is not cut. Sections
are what the validation rule holds out (held_out) and what the tokenizer processes share.
"""

import gzip
import hashlib
import io
import json
import os
import re

import numpy as np

from tokenizer import GPT2_EOT

WHOLE_CHARS = 8192  # a document up to this long is one section
SECTION_CHARS = 1024  # a longer one is cut at the first safe place past every this many characters
READ_CHARS = 1 << 20  # a text file is read this many characters at a time
CUT = re.compile(r'(?<=\S)(?=\s)')  # between a non-space and a space: no BPE token spans it
CHECK_CHARS = 256  # a tokenizer without such a proof is asked about this much text either side of a place
CHECK_TRIES = 16  # places asked a section before the stretch is left whole


class CorpusError(Exception):
    """Input that cannot be read at all: one line saying which and why."""


class Tally:
    """What the readers met: documents, malformed records (with the first few places), input bytes."""

    def __init__(self):
        self.documents, self.malformed, self.places, self.bytes_done, self.bytes, self.sections = (
            0, 0, [], 0, 0, 0)

    def bad(self, place, why):
        self.malformed += 1
        if len(self.places) < 3:
            self.places.append(f"{place}: {why}")


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
            raise CorpusError(f"{path}: no such file or folder")
    if not found:
        raise CorpusError(f"no files under {' '.join(paths)}")
    return found


def documents(paths, text_key, tally):
    """Yield (piece, last) for every document of the files: its text in one or more pieces, last
    True on a document's final piece."""
    for path in paths:
        name = path.lower()
        with open(path, 'rb') as raw:
            if name.endswith('.parquet'):
                yield from _parquet(path, raw, text_key, tally)
            elif name.endswith(('.jsonl', '.jsonl.gz', '.jsonl.zst')):
                yield from _jsonl(path, raw, text_key, tally)
            else:
                yield from text_document(io.TextIOWrapper(raw, encoding='utf-8', newline=''),
                                         path, tally, raw)
        tally.bytes_done += os.path.getsize(path)
        tally.bytes = tally.bytes_done


def text_document(stream, name, tally, raw=None):
    """Yield (piece, last): the text of a stream as one document, READ_CHARS characters at a time.
    An empty stream is no document."""
    pending = None
    try:
        while piece := stream.read(READ_CHARS):
            if raw is not None:
                tally.bytes = tally.bytes_done + raw.tell()
            if pending is not None:
                yield pending, False
            pending = piece
    except UnicodeDecodeError as e:
        raise CorpusError(f"{name}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
    if pending is not None:
        tally.documents += 1
        yield pending, True


def _jsonl(path, raw, text_key, tally):
    for number, line in enumerate(_lines(_decompressed(path, raw)), 1):
        tally.bytes = tally.bytes_done + raw.tell()
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            tally.bad(f"{path} line {number}", 'not UTF-8')
            continue
        except ValueError:
            tally.bad(f"{path} line {number}", 'not JSON')
            continue
        text = record.get(text_key) if isinstance(record, dict) else None
        if _is_document(text, f"{path} line {number}", text_key, tally):
            yield text, True


def _decompressed(path, raw, block=1 << 20):
    """The bytes of a .jsonl, .jsonl.gz or .jsonl.zst file, a block at a time. A compressed file
    that ends before its end marker (a partial download) is an error, never a shorter corpus."""
    truncated = CorpusError(f"{path}: truncated: the compressed data ends before its end marker "
                            f"(a partial download?)")
    if path.lower().endswith('.zst'):
        yield from _zstd_frames(path, raw, block, truncated)
        return
    stream = gzip.GzipFile(fileobj=raw) if path.lower().endswith('.gz') else raw
    try:
        while data := stream.read(block):
            yield data
    except EOFError:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        raise truncated from None
    except OSError as e:  # damaged rather than cut short
        raise CorpusError(f"{path}: cannot decompress ({e})") from None


def _zstd_frames(path, raw, block, truncated):
    """zstandard's stream reader ends quietly where a cut file ends; frame by frame, the end of each
    frame is seen (the Pile's files hold several)."""
    try:
        import zstandard
    except ImportError:
        raise CorpusError(f"{path}: reading .zst needs the zstandard package: "
                          f"pip install zstandard") from None
    context = zstandard.ZstdDecompressor()
    frame, inside = context.decompressobj(), False  # inside: the current frame has begun
    try:
        while data := raw.read(block):
            while data:
                inside = True
                yield frame.decompress(data)
                data = b''
                if frame.eof:  # the rest of the block belongs to the next frame
                    data, frame, inside = frame.unused_data, context.decompressobj(), False
    except zstandard.ZstdError as e:
        raise CorpusError(f"{path}: cannot decompress ({e})") from None
    if inside:
        raise truncated


def _lines(blocks):
    """The lines of a stream of byte blocks (without their newlines)."""
    pending = []
    for data in blocks:
        *whole, last = data.split(b'\n')
        if whole:
            yield b''.join(pending) + whole[0]
            yield from whole[1:]
            pending = []
        pending.append(last)
    if any(pending):
        yield b''.join(pending)


def _parquet(path, raw, text_key, tally):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading .parquet needs the pyarrow package: "
                          f"pip install pyarrow") from None
    try:
        table = pq.ParquetFile(raw)
    except Exception as e:  # pyarrow's ArrowInvalid and kin, for a file that is not parquet
        raise CorpusError(f"{path}: not a parquet file ({e})") from None
    if text_key not in table.schema_arrow.names:
        raise CorpusError(f"{path}: no {text_key!r} column (it has {', '.join(table.schema_arrow.names)})")
    row = 0
    for batch in table.iter_batches(batch_size=1024, columns=[text_key]):
        tally.bytes = tally.bytes_done + raw.tell()
        for text in batch.column(0).to_pylist():
            row += 1
            if _is_document(text, f"{path} row {row}", text_key, tally):
                yield text, True


def _is_document(text, place, text_key, tally):
    """Whether a record's text counts as a document. A record without a text string is malformed;
    an empty one is skipped."""
    if not isinstance(text, str):
        tally.bad(place, f"no {text_key!r} string")
        return False
    tally.documents += bool(text)
    return bool(text)


def sections(pieces, cut=True):
    """Yield (text, last) sections from (piece, last) pieces of documents. A short document is one
    section; a longer one is cut near every SECTION_CHARS characters at a place no BPE token spans
    (module docstring). last marks the end of a document. A stretch without such a place is never
    cut. cut: True (GPT-2's BPE and characters, for which every such place is proven), False
    (documents whole), or safe(before, after) -> bool, asked of each place with CHECK_CHARS of text
    on either side (prepare_data.py's check for other tokenizers), at most CHECK_TRIES places a
    section."""
    buffer, long = '', False
    for piece, last in pieces:
        buffer += piece
        long = bool(cut) and (long or len(buffer) > WHOLE_CHARS)
        start = 0
        while long and len(buffer) - start > SECTION_CHARS:
            place = _cut_place(buffer, start + SECTION_CHARS, cut, last)
            if place is None:
                break
            yield buffer[start:place], False
            start = place
        buffer = buffer[start:]
        if last:
            yield buffer, True
            buffer, long = '', False


def _cut_place(buffer, after, cut, last):
    """The first place past `after` where the buffer may be cut, or None (for now: more text may come)."""
    for tries, match in enumerate(CUT.finditer(buffer, after)):
        place = match.start()
        if cut is True:
            return place
        if tries == CHECK_TRIES or (place + CHECK_CHARS > len(buffer) and not last):
            return None  # a stretch that will not cut, or too little text after the place to check it yet
        if cut(buffer[max(0, place - CHECK_CHARS):place], buffer[place:place + CHECK_CHARS]):
            return place
    return None


def held_out(index, val_fraction):
    """The validation rule: section `index` of a corpus (counting from 0, in reading order) is held
    out when the first 8 bytes of its blake2b hash, as a fraction, fall below val_fraction. It needs
    no corpus size, and holds out whole documents except for the long ones, of which it takes
    some sections."""
    digest = hashlib.blake2b(index.to_bytes(8, 'little'), digest_size=8).digest()
    return int.from_bytes(digest, 'little') / 2 ** 64 < val_fraction


def random_starts(n_tokens, length, count, generator):
    """`count` random offsets of windows of length + 1 tokens in a file of n_tokens, drawn by a torch
    generator, as Python ints (int64 draws: files pass 2^32 tokens)."""
    import torch
    return torch.randint(n_tokens - length, (count,), generator=generator, dtype=torch.int64).tolist()


def read_windows(path, dtype, n_tokens, starts, length, vocab_size=None):
    """The windows of length + 1 tokens at `starts` of a token file: int64 arrays (len(starts), length)
    of inputs, and of the tokens that follow each. With vocab_size, the ids read are checked against
    it (check_ids)."""
    data = np.memmap(path, dtype=dtype, mode='r', shape=(n_tokens,))  # opened anew: a kept memmap leaks
    windows = np.stack([data[i:i + length + 1] for i in starts]).astype(np.int64)
    if vocab_size is not None:
        check_ids(path, windows, vocab_size)
    return windows[:, :-1], windows[:, 1:]


def random_windows(path, dtype, n_tokens, length, count, generator, vocab_size=None):
    """`count` windows at random offsets: what train.py trains and evaluates on."""
    starts = random_starts(n_tokens, length, count, generator)
    return read_windows(path, dtype, n_tokens, starts, length, vocab_size)


def check_ids(path, ids, vocab_size):
    """Raise CorpusError, one line, when token ids read from path reach past the vocabulary: a dataset
    whose meta.json and token files come from two tokenizers, or were edited, would otherwise index
    past the model's embedding (an IndexError, or a device-side assert on a GPU)."""
    top = int(ids.max()) if ids.size else -1
    if top >= vocab_size:
        raise CorpusError(f"{path} holds token id {top}, past the vocabulary of {vocab_size} in its "
                          f"meta.json: its tokens and meta.json are of two tokenizers (or edited): "
                          f"prepare it again with prepare_data.py")


# -----------------------------------------------------------------------------
# a prepared dataset (prepare_data.py's output), as train.py and eval.py read it


def dataset_folder(dataset):
    """A folder that holds a meta.json, or a name under data/ (not a raw text folder of the same name)."""
    return dataset if os.path.isfile(os.path.join(dataset, 'meta.json')) else os.path.join('data', dataset)


def read_dataset(data_dir):
    """A prepared dataset's meta.json, after checking that its token files are whole (meta.json is
    written last). Raises CorpusError, one line, when they are missing, foreign or cut short."""
    try:
        with open(os.path.join(data_dir, 'meta.json')) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        raise CorpusError(f"no dataset at {data_dir} (no readable meta.json): "
                          f"make one with prepare_data.py") from None
    if (not isinstance(meta, dict)
            or not {'train_tokens', 'val_tokens', 'dtype', 'vocab_size', 'tokenizer'} <= meta.keys()):
        raise CorpusError(f"{data_dir}/meta.json was not written by prepare_data.py: rerun it")
    problem = meta_problem(meta)
    if problem:
        raise CorpusError(f"{data_dir}/meta.json: {problem}: prepare the dataset again with prepare_data.py")
    for split in ('train', 'val'):
        path = os.path.join(data_dir, f"{split}.bin")
        expected = meta[f"{split}_tokens"] * np.dtype(meta['dtype']).itemsize
        if not os.path.isfile(path) or os.path.getsize(path) != expected:
            raise CorpusError(f"{path} does not match {data_dir}/meta.json: rerun prepare_data.py")
    return meta


def meta_problem(meta):
    """What in a meta.json's values no dataset of prepare_data.py has (a phrase), or None: the counts
    whole numbers, and the token ids it records (the largest, the end token; datasets written before
    the largest was recorded have none) inside its vocabulary, so that no reader indexes past it."""
    whole = lambda value: type(value) is int and value >= 0  # not a bool, not a float
    for key in ('vocab_size', 'train_tokens', 'val_tokens'):
        if not whole(meta[key]) or meta[key] == 0 and key == 'vocab_size':
            return f"{key} is {meta[key]!r}, not a {'positive ' * (key == 'vocab_size')}whole number"
    if meta['dtype'] not in ('uint16', 'uint32'):
        return f"dtype is {meta['dtype']!r}, not uint16 or uint32"
    vocab = meta['vocab_size']
    chars = meta.get('chars') if isinstance(meta.get('chars'), list) else []
    if meta['tokenizer'] == 'char' and len(chars) != vocab:
        return f"vocab_size is {vocab}, but its character table has {len(chars)} entries"
    # a model sized to the file's vocabulary would index past it with GPT-2's ids
    if meta['tokenizer'] == 'gpt2' and vocab != GPT2_EOT + 1:
        return f"vocab_size is {vocab}, but GPT-2's BPE has {GPT2_EOT + 1:,} tokens"
    if 'max_token_id' in meta and not (type(meta['max_token_id']) is int and meta['max_token_id'] < vocab):
        return (f"its token ids reach {meta['max_token_id']!r} (max_token_id), past its vocab_size of "
                f"{vocab}: its tokens and meta.json are of two tokenizers, or it was edited")
    if 'eot_token' in meta and not (type(meta['eot_token']) is int and 0 <= meta['eot_token'] < vocab):
        return f"its end-of-text token is {meta['eot_token']!r} (eot_token), past its vocab_size of {vocab}"
    return None
