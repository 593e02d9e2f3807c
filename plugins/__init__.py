"""Built-in components, stages and commands. Each module here is a plugin that registers through
the same hooks as a third-party package; they load unless named in ``INSTRUCTRL_DISABLE_PLUGINS``
(``INSTRUCTRL_DISABLE_PLUGIN_AUTOLOAD`` only stops the discovery of other packages)."""

DEFAULT_PLUGINS: tuple[str, ...] = (
    "instructrl.plugins.advantages",
    "instructrl.plugins.commands.claims",
    "instructrl.plugins.commands.report",
    "instructrl.plugins.commands.sweep",
    "instructrl.plugins.extra_losses",
    "instructrl.plugins.hf",
    "instructrl.plugins.kl",
    "instructrl.plugins.loggers",
    "instructrl.plugins.objectives",
    "instructrl.plugins.reward_transforms",
    "instructrl.plugins.rewards",
    "instructrl.plugins.stages.evaluate",
    "instructrl.plugins.stages.lm",
    "instructrl.plugins.stages.rl",
    "instructrl.plugins.stages.rm",
    "instructrl.plugins.tasks.jsonl",
    "instructrl.plugins.tasks.world",
)
