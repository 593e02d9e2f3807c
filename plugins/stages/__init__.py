"""Built-in pipeline stages: pretrain and sft (lm.py), rm, rl (rl.py, with the iteration in rl_step.py) and eval."""
