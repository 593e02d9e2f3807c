"""The pipeline stages (LightningModules driven by ``lightning.Trainer``): pretrain → sft → rm →
rl → eval."""
