"""A FIFO ring buffer of L2-normalised teacher embeddings and their labels (RPSD's memory bank).

The teacher is frozen, so its embeddings never go stale: no momentum encoder is needed. Everything is a
registered buffer, so the bank travels with `.to(device)` and is saved by `state_dict()`. Every rank
enqueues the same all-gathered global batch, so every rank holds the same bank.
"""
import torch
import torch.nn.functional as F


class SlotBuffers(torch.nn.Module):
    """size slots with a label and a validity flag each, plus `wide_buffers` of shape [size, dim] whose width is
    taken from the first write (or from a loaded state_dict) when `dim` is left None."""

    wide_buffers = ("feats",)
    uses_index = False   # True: slot m belongs to dataset sample m

    def __init__(self, size, dim=None, fp16=False):
        super().__init__()
        self.size = int(size)
        self.dtype = torch.float16 if fp16 else torch.float32
        for name in self.wide_buffers:
            self.register_buffer(name, torch.zeros((self.size, int(dim)) if dim else (0, 0), dtype=self.dtype))
        self.register_buffer("labels", torch.full((self.size,), -1, dtype=torch.int64))
        self.register_buffer("valid", torch.zeros(self.size, dtype=torch.bool))

    @property
    def dim(self):
        return self.feats.shape[1] if self.feats.numel() else None

    def num_valid(self):
        return int(self.valid.sum())

    def fill(self):
        return self.num_valid() / self.size

    def _make_wide(self, dim):
        for name in self.wide_buffers:
            setattr(self, name, torch.zeros(self.size, dim, dtype=self.dtype, device=self.labels.device))

    def _store(self, name, slots, rows):
        buf = getattr(self, name)
        buf[slots] = F.normalize(rows.detach().float(), dim=1).to(device=buf.device, dtype=buf.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A bank that has not seen a batch yet has no width: take it from the checkpoint.
        saved = state_dict.get(prefix + "feats")
        if saved is not None and self.feats.numel() == 0 and saved.numel() > 0:
            self._make_wide(saved.shape[1])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class MemoryBank(SlotBuffers):
    """size slots of (embedding, label), first in first out; `dim` may be left None and is then taken from the
    first enqueue (or from a loaded state_dict). fp16=True halves the memory (unit vectors lose nothing that
    matters)."""

    def __init__(self, size, dim=None, fp16=False):
        if int(size) <= 0:
            raise ValueError(f"memory bank size must be positive, got {size}")
        super().__init__(size, dim, fp16)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, feats, labels):
        """Append a batch in order, overwriting the oldest entries; the same as appending one at a time.

        Returns (slots written, first row of the batch kept): rows before it were overwritten by later rows."""
        if feats.ndim != 2 or labels.shape != feats.shape[:1]:
            raise ValueError(f"enqueue wants feats [n, d] and labels [n], got {tuple(feats.shape)} and "
                             f"{tuple(labels.shape)}")
        if self.feats.numel() == 0:
            self._make_wide(feats.shape[1])
        if feats.shape[1] != self.feats.shape[1]:
            raise ValueError(f"memory bank holds {self.feats.shape[1]}-d embeddings, got {feats.shape[1]}-d")
        n = feats.shape[0]
        keep = min(n, self.size)
        start = int(self.ptr) + n - keep
        slots = (start + torch.arange(keep, device=self.labels.device)) % self.size
        if n == 0:
            return slots, 0
        self._store("feats", slots, feats[n - keep:])
        self.labels[slots] = labels[n - keep:].to(device=self.labels.device, dtype=torch.int64)
        self.valid[slots] = True
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        return slots, n - keep

    def order(self):
        """Slots of the valid entries, oldest first."""
        order = (int(self.ptr) + torch.arange(self.size, device=self.labels.device)) % self.size
        return order[self.valid[order]]

    def entries(self):
        """(feats, labels) of the valid entries, oldest first (for inspection and tests)."""
        order = self.order()
        feats = self.feats[order] if self.feats.numel() else self.feats.new_zeros(0, 0)
        return feats, self.labels[order]

    def extra_repr(self):
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}"
