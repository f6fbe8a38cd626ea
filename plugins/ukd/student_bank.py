"""Banks that keep the student's embedding beside each teacher key, so that RPSD can compare student with student
through the bank (relation='student'): the teacher's key gives the target <t_i, t_j>, the stored student key the
student's side <s_i, s_j>. The student entries are stale (written after earlier steps) and carry no gradient.

Two ways to keep them, chosen by rpsd's `bank_update`:

- StudentQueue ('fifo'): the newest `size` samples, oldest overwritten; an entry is at most size / batch steps old.
- StudentSlots ('momentum'): one slot per training sample, addressed by its dataset index; a revisited sample's
  entries move towards the new embeddings with momentum (a running average over views and epochs). Needs the
  loader's sample indices and as many slots as training samples.

Both are filled from the all-gathered global batch, so every rank holds the same bank, and keep everything in
registered buffers, so the bank is saved and restored with the checkpoint.
"""
import torch
import torch.nn.functional as F

from arcface.errors import ConfigError

from .memory_bank import MemoryBank, SlotBuffers


class StudentQueue(MemoryBank):
    """MemoryBank (teacher keys `feats`, `labels`) plus `student`: the student's unit embedding of each entry."""

    wide_buffers = ("feats", "student")

    @torch.no_grad()
    def update(self, teacher, student, labels, index=None):
        if student.shape != teacher.shape:
            raise ValueError(f"student bank: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                             "embeddings must have the same shape")
        slots, first = self.enqueue(teacher, labels)
        if slots.numel():
            self._store("student", slots, student[first:])

    def entries(self):
        """(teacher feats, student feats, labels) of the valid entries, oldest first."""
        order = self.order()
        return self.feats[order], self.student[order], self.labels[order]


def last_occurrence(index):
    """Positions of the last occurrence of each distinct value of a 1-D tensor (a later view of the same sample
    wins, whatever the scatter order)."""
    values, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    last = torch.full((values.numel(),), -1, dtype=torch.long, device=index.device)
    return last.scatter_reduce(0, inverse, positions, reduce="amax")


def missing_index_error():
    return ConfigError("the momentum student bank (rpsd bank_update='momentum') stores each sample in the slot of "
                       "its dataset index, but this batch carries no sample indices: use a loader that returns them "
                       "(the PyTorch RecordIO / image-folder loader, dali=False) or bank_update='fifo'")


class StudentSlots(SlotBuffers):
    """One slot per training sample: slot m holds sample m's teacher and student unit embeddings and label.

    A first visit writes the sample as is; a later one writes normalize(momentum * old + (1 - momentum) * new)
    for both the teacher and the student entry (the same average for both, so that a pair of slots stays a
    matched pair). momentum 0 keeps the latest view.
    """

    wide_buffers = ("feats", "student")
    uses_index = True

    def __init__(self, size, momentum=0.5, dim=None, fp16=False):
        if int(size) <= 0:
            raise ValueError(f"student bank size must be positive, got {size}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"student bank momentum must be in [0, 1), got {momentum}")
        super().__init__(size, dim, fp16)
        self.momentum = float(momentum)

    @torch.no_grad()
    def update(self, teacher, student, labels, index):
        if index is None:
            raise missing_index_error()
        if teacher.ndim != 2 or student.shape != teacher.shape or labels.shape != teacher.shape[:1] \
                or index.shape != labels.shape:
            raise ValueError(f"student bank update wants teacher and student [n, d], labels and index [n], got "
                             f"{tuple(teacher.shape)}, {tuple(student.shape)}, {tuple(labels.shape)}, "
                             f"{tuple(index.shape)}")
        index = index.to(device=self.labels.device, dtype=torch.int64)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.size):
            bad = int(index.max()) if int(index.max()) >= self.size else int(index.min())
            raise ConfigError(f"the momentum student bank has {self.size} slots (rpsd bank=...) but got dataset "
                              f"index {bad}: it needs one slot per training sample; raise bank to at least the "
                              "number of training images")
        if self.feats.numel() == 0:
            self._make_wide(teacher.shape[1])
        if teacher.shape[1] != self.feats.shape[1]:
            raise ValueError(f"student bank holds {self.feats.shape[1]}-d embeddings, got {teacher.shape[1]}-d")
        rows = last_occurrence(index)
        slots = index[rows]
        seen = self.valid[slots][:, None]
        for name, new in (("feats", teacher), ("student", student)):
            buf = getattr(self, name)
            new = F.normalize(new[rows.to(new.device)].detach().float(), dim=1).to(buf.device)
            mixed = torch.where(seen, self.momentum * buf[slots].float() + (1.0 - self.momentum) * new, new)
            buf[slots] = F.normalize(mixed, dim=1).to(buf.dtype)
        self.labels[slots] = labels[rows.to(labels.device)].to(device=self.labels.device, dtype=torch.int64)
        self.valid[slots] = True

    def entries(self):
        """(teacher feats, student feats, labels) of the valid slots, in slot (= dataset index) order."""
        order = self.valid.nonzero().flatten()
        return self.feats[order], self.student[order], self.labels[order]

    def extra_repr(self):
        return f"size={self.size}, momentum={self.momentum}, dim={self.dim}, dtype={self.dtype}"
