"""Built-in components. Each module here is a plugin that registers through the same hooks as a
third-party package; they are always loaded (``INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD`` only stops the
discovery of other packages)."""

DEFAULT_PLUGINS: tuple[str, ...] = (
    "instructrl.plugins.advantages",
    "instructrl.plugins.extra_losses",
    "instructrl.plugins.hf",
    "instructrl.plugins.kl",
    "instructrl.plugins.loggers",
    "instructrl.plugins.objectives",
    "instructrl.plugins.reward_transforms",
    "instructrl.plugins.rewards",
    "instructrl.plugins.tasks.jsonl",
    "instructrl.plugins.tasks.world",
)
