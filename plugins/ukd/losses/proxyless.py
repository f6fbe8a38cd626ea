"""ProxylessKD: the student trained against the teacher's classifier, kept fixed (Shi et al., arXiv 2011.00265)."""
import torch

from arcface.errors import ConfigError

from ..batch import KDBatch, KDOutput
from ..head_terms import no_term, require_head, require_unit_weight
from ..teacher_centres import centres_from_cache, centres_from_checkpoints
from .base import KDLoss
from .registry import register_kd_loss


@register_kd_loss("proxyless")
class ProxylessLoss(KDLoss):
    """Partial FC's centres replaced by the teacher's and frozen: the margin softmax then pulls the student's
    embeddings into the teacher's embedding space directly, with no imitation term (the "proxy" task).

    Parameters (config keys; exactly one):
        teacher_head: the teacher run's output folder with its checkpoint_gpu_<rank>.pt (an arcface_torch run or
            ours, any world size; `state_dict_softmax_fc` -> `weight`, shards laid out as
            arcface.partial_fc.shard_range). Loaded when the head is configured, before the optimizer exists.
        teacher_cache: a teacher embedding cache (tools/cache_teacher.py) of this run's training set: each centre
            is the normalised mean of its identity's unit teacher embeddings (both views), over the samples the
            training loader labels with it. Made at start-up (the loader is known then).

    Every rank reads and holds only the rows of its own shard. The teacher's classifier must cover exactly
    num_classes identities with embedding_size-d centres (checked at start-up). The margin is the engine's.
    Weight: the term is zero, the distillation is loss/cls; only weight 1 is accepted (head_terms.py). The
    per-step teacher forward of the plugin is not needed by this loss: with it alone, a cache backend keeps it cheap.
    Statistics: none.
    """
    uses_head = True

    def __init__(self, teacher_head=None, teacher_cache=None):
        super().__init__()
        if (teacher_head is None) == (teacher_cache is None):
            raise ConfigError("KD loss 'proxyless' takes its teacher centres from exactly one source: teacher_head "
                              "(the teacher run's folder of checkpoint_gpu_<rank>.pt) or teacher_cache (a teacher "
                              f"embedding cache file); got teacher_head={teacher_head!r}, "
                              f"teacher_cache={teacher_cache!r}")
        for key, value in (("teacher_head", teacher_head), ("teacher_cache", teacher_cache)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"KD loss 'proxyless': {key} must be a path, got {value!r}")
        self.teacher_head, self.teacher_cache = teacher_head, teacher_cache
        self.head = None

    def configure_head(self, head):
        require_head(head, self.name)
        head.weight.requires_grad_(False)
        self.head = head
        if self.teacher_head is not None:
            self._copy(centres_from_checkpoints(self.teacher_head, head.num_classes, head.embedding_size,
                                                head.class_start, head.num_local))

    def bind_training(self, ctx):
        require_unit_weight(ctx.cfg, self.name)
        if self.head is None:
            raise ConfigError("KD loss 'proxyless' replaces Partial FC's centres, but this host never called "
                              "configure_head (patches/ukd_graft.py runs upstream's head: use tools/train.py)")
        if self.teacher_cache is not None:
            from ..cache.file_format import dataset_identity, open_for_training

            labels = getattr(ctx.train_loader, "labels", None)
            if labels is None:
                raise ConfigError("KD loss 'proxyless' with teacher_cache needs the training loader's labels of "
                                  "every sample (the PyTorch RecordIO loader has them; DALI does not)")
            where = "KD loss 'proxyless' teacher_cache needs cfg.rec to be"
            try:
                cache = open_for_training(self.teacher_cache, dataset_identity(ctx.cfg.rec, what=where),
                                          ctx.cfg.input_size, self.head.embedding_size)
            except ConfigError as err:
                raise ConfigError(f"KD loss 'proxyless', teacher_cache={self.teacher_cache!r}: {err} (the centres' "
                                  f"size is embedding_size={self.head.embedding_size})") from err
            labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels
            self._copy(centres_from_cache(cache, labels, self.head.class_start, self.head.num_local))

    def _copy(self, rows):
        with torch.no_grad():
            self.head.weight.copy_(rows.to(self.head.weight))

    def forward(self, batch: KDBatch) -> KDOutput:
        return no_term(batch, {})
