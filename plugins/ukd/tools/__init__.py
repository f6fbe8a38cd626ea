"""The distillation plugin's command-line tools (console scripts `ukd-*`): cache_teacher, demo, kd_study,
device_check."""
