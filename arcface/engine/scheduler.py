"""Polynomial learning-rate decay with linear warmup, stepped once per optimizer step.

Same closed form as arcface_torch's PolynomialLRWarmup (power 1 = linear decay):
    t <= warmup:  lr = base * t / warmup
    t >  warmup:  lr = base * (1 - (t - warmup) / (total - warmup)) ** power,  t clipped at total
Upstream steps it every micro-step under gradient accumulation; the trainer here steps it per optimizer step.
"""
from torch.optim.lr_scheduler import LRScheduler


def poly_warmup_lr(base_lr, step, warmup, total, power=1.0):
    step = min(step, total)
    if warmup > 0 and step <= warmup:
        return base_lr * step / warmup
    span = max(total - warmup, 1)
    return base_lr * (1.0 - (step - warmup) / span) ** power


class PolynomialLRWarmup(LRScheduler):
    def __init__(self, optimizer, warmup_iters, total_iters=5, power=1.0, last_epoch=-1):
        self.warmup_iters = max(int(warmup_iters), 0)
        self.total_iters = max(int(total_iters), 1)
        self.power = power
        super().__init__(optimizer, last_epoch)

    def retarget(self, base_lr, warmup_iters, total_iters):
        """Continue from the current step with another peak lr or length (a resume with a changed config):
        every param group's lr is set to the new curve's value at this step."""
        self.warmup_iters = max(int(warmup_iters), 0)
        self.total_iters = max(int(total_iters), 1)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = base_lr
        self.base_lrs = [base_lr for _ in self.optimizer.param_groups]
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def get_lr(self):
        return [poly_warmup_lr(base, self.last_epoch, self.warmup_iters, self.total_iters, self.power)
                for base in self.base_lrs]
