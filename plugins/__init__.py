"""This project's plugins for the arcface engine, registered through the `arcface.plugins` entry points
(setup.cfg): `ukd` (knowledge distillation, config section `kd`) and `feature_norm` (a small example that uses
every hook)."""
