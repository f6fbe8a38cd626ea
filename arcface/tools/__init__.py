"""The engine's command-line tools, one module each with `main(argv=None) -> int` (console scripts `ukd-*`).

train, eval_verification, eval_ijb, torch2onnx, inference (embed one image), flops (parameters and FLOPs of a
backbone), pack_rec, inspect_rec, make_synthetic, gen_config_docs.
`tools/<name>.py` in the repository runs the same main, for upstream-style `torchrun tools/train.py CONFIG`.
"""
