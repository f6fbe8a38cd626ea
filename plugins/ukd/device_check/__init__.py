"""The device check (tools/device_check.py): one prepared run that proves the CUDA paths and times the speed
claims on a lent GPU machine, and runs what is meaningful on a CPU-only machine.

One module per group of checks, run in this order: environment, data (generated faces, the CUDA prefetch, DALI's
GPU decoder), training (fp32 / fp16 + GradScaler / bf16 through the trainer), distributed (torchrun with NCCL),
kd (the KD plugin's teacher and cache on CUDA), speed. core.py holds the table of checks and runs them with time
budgets; report.py writes report.json and report.md.
"""
