"""
The KV caches of generation: the keys and values of the positions seen so far, so that a new token
costs one position's work, under the paper's SM-I (every row keeps the pseudo mass it had at the
training length: a cached step computes what a full forward pass would).

KVCache grows with the text and hands each step exactly the keys it sees: the fastest without a
compiler. FixedKVCache has the same shapes at every decode step (a ring of slots written by index,
read whole under a mask), so torch.compile traces the step once and a GPU can replay it as a CUDA
graph: what sample.py --compile=True uses.

Prompts of different lengths share a cache left-padded (model.left_padded): `pad` (B,) counts the
padding that opens each row. Every row has positions of its own (its first token is position 0) and
no real token sees padding; the cache's slots stay shared, since padding shifts a row's positions
and keys alike, so the distances, the window and the ring are those of the columns.
"""

import torch

from stablemask_sdpa import log_pseudo_mass, ring_bias


class KVCache:
    """One preallocated buffer per layer, for up to max_len positions. With a window, only what
    later rows can see is kept: the buffer holds twice the window, and when it fills, its newest
    window-1 entries move to its front (once every window tokens, not at every token). pad (B,): how
    many padding tokens open each row (above), or None."""

    def __init__(self, n_layer, max_len, window=None, pad=None):
        self.window = window
        self.capacity = max_len if window is None else min(max_len, 2 * window)
        self.pos = 0  # columns seen: the column of the next token (its position, without padding)
        self.held = 0  # entries in the buffers
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.table = None  # (H, rows): every row's log pseudo mass, for the decode steps
        self.pad = pad
        self.max_pad = 0 if pad is None else int(pad.max())

    @property
    def empty(self):
        return self.pos == 0

    def positions(self, T, device):
        """The positions of the next T tokens, (T,), or (B, T) with padding (0 on the padding)."""
        pos = torch.arange(self.pos, self.pos + T, device=device)
        return pos if self.pad is None else (pos - self.pad[:, None]).clamp(min=0)

    def log_mass(self, gamma, pos, pseudo_len):
        """The log pseudo mass of the rows at positions pos, (H, T) or (B, H, T). A decode step (one row)
        reads it from a table of every row's, made once (a pass would compute it in some ten small
        operations), and has None once every row is past the pseudo columns: there StableMask is plain
        causal attention."""
        if pos.size(-1) != 1 or not isinstance(pseudo_len, int):
            return log_pseudo_mass(gamma, pos, pseudo_len)
        # the row with the most padding is the one furthest behind
        if self.pos - self.max_pad >= pseudo_len - 1:
            return None
        if self.table is None:
            # row pseudo_len - 1 included: its mass is 0 (-inf), where rows past it read theirs
            self.table = log_pseudo_mass(gamma, torch.arange(pseudo_len, device=gamma.device), pseudo_len)
        if self.pad is None:
            return self.table[:, self.pos:self.pos + 1]
        return self.table[:, pos.clamp(max=pseudo_len - 1)].transpose(0, 1)

    def step_bias(self, alibi):
        """A mask over the cache for the step: none, the keys handed to it are the ones it sees."""
        return None

    def key_pad(self):
        """(B,): how many of the keys the next pass attends to are padding, or None where none is."""
        first = self.pos - self._kept()  # the column of the first of those keys
        return None if first >= self.max_pad else (self.pad - first).clamp(min=0)

    def _kept(self):
        """How many held entries the next rows can still see."""
        return self.held if self.window is None else min(self.held, self.window - 1)

    def update(self, layer, k, v):
        """Store k, v (B, H, T, D) of the next T positions; return the keys and values these rows
        attend to: every one held before, or with a window the last window-1, then the new ones."""
        if self.k[layer] is None:
            shape = (*k.shape[:2], self.capacity, k.size(-1))
            self.k[layer], self.v[layer] = k.new_empty(shape), v.new_empty(shape)
        T, kept = k.size(2), self._kept()
        start = self.held - kept
        if self.held + T > self.capacity:  # only with a window: move what is still seen to the front
            k = torch.cat([self.k[layer][:, :, start:self.held], k], dim=2)
            v = torch.cat([self.v[layer][:, :, start:self.held], v], dim=2)
            n = min(k.size(2), self.capacity)
            self.k[layer][:, :, :n], self.v[layer][:, :, :n] = k[:, :, -n:], v[:, :, -n:]
            return k, v
        self.k[layer][:, :, self.held:self.held + T] = k
        self.v[layer][:, :, self.held:self.held + T] = v
        return self.k[layer][:, :, start:self.held + T], self.v[layer][:, :, start:self.held + T]

    def advance(self, T):
        """Count the T positions every layer has just stored."""
        moved = self.held + T > self.capacity
        self.held = min(self._kept() + T, self.capacity) if moved else self.held + T
        self.pos += T


class FixedKVCache:
    """A ring of `size` slots per layer (the window, or the whole text without one): position p
    lives in slot p % size, so the newest `size` positions are held and nothing ever moves. The
    prompt fills it in one pass (its rows attend to the prompt itself, in order); then every decode
    step writes its keys by index at a slot read from a position tensor and attends to the whole
    ring, the slots not yet written hidden by the bias. Attention does not care in which order its
    keys come, only ALiBi's bias does, and it is taken from each slot's distance. No Python number
    changes between decode steps, so nothing the compiler guards on does. pad (B,): how many padding
    tokens open each row (above; p counts columns then), hidden by the bias too, or None."""

    def __init__(self, n_layer, size, window=None, pad=None):
        self.window = window  # what the prompt's pass attends within; the ring holds just as much
        self.size = size if window is None else min(size, window)
        self.empty = True  # until the prompt's pass; its rows attend among themselves
        self.position = None  # the column of the next token: a tensor on the cache's device
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.pad = pad

    def positions(self, T, device):
        """The positions of the next T tokens, (T,), or (B, T) with padding (0 on the padding). A decode
        step's come from the tensor, so that it is the same graph each time."""
        pos = (torch.arange(T, device=device) if self.empty
               else self.position + torch.arange(T, device=device))
        return pos if self.pad is None else (pos - self.pad[:, None]).clamp(min=0)

    def log_mass(self, gamma, pos, pseudo_len):
        """The log pseudo mass of the rows at positions pos, (H, T) or (B, H, T): a decode step's from the
        position tensor, so that it is the same graph each time."""
        return log_pseudo_mass(gamma, pos, pseudo_len)

    def step_bias(self, alibi):
        """A decode step's mask over the ring (ALiBi's bias and the padding with it), once for every layer
        of the pass; None for the prompt's pass, whose rows attend among themselves."""
        return None if self.empty else ring_bias(alibi, self.position, self.size, self.pad)

    def key_pad(self):
        """(B,): how many of the prompt's keys are padding (None: none); a decode step's mask holds it."""
        return self.pad if self.empty else None

    def update(self, layer, k, v):
        """Store k, v (B, H, T, D) of the next T positions; return what they attend to: the prompt's
        own keys and values for the prompt's pass (T may pass the ring: its last `size` are kept),
        the whole ring for a decode step (T = 1)."""
        if self.empty:
            if self.k[layer] is None:
                shape = (*k.shape[:2], self.size, k.size(-1))
                self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
                self.position = torch.zeros((), dtype=torch.long, device=k.device)
            T = k.size(2)
            slots = torch.arange(max(0, T - self.size), T, device=k.device) % self.size
            self.k[layer].index_copy_(2, slots, k[:, :, -self.size:])
            self.v[layer].index_copy_(2, slots, v[:, :, -self.size:])
            return k, v
        if k.size(2) != 1:
            raise ValueError("after the prompt's pass a FixedKVCache takes one token a step")
        slot = (self.position % self.size).view(1)
        self.k[layer].index_copy_(2, slot, k)
        self.v[layer].index_copy_(2, slot, v)
        return self.k[layer], self.v[layer]

    def advance(self, T):
        """Count the T positions every layer has just stored."""
        self.position += T  # in place: the compiled step's input stays the same tensor
        self.empty = False
