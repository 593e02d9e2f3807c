"""Built-in launcher commands: ``instructrl sweep`` (:mod:`.sweep`: a grid of recipe overrides ×
seeds, run in parallel, resumable) and ``instructrl report`` (:mod:`.report`: means over seeds with
95% intervals, paired differences to a baseline arm, learning curves and the reward–KL frontier).
Each module registers its command through the ``register_commands`` hook, exactly as a
third-party package would: an object with ``key_value_options``, ``add_arguments(parser)`` and
``run(args) -> int`` (the ``Command`` protocol)."""
