"""The small core of instructrl: interfaces, registry, recipes, launcher and the Lightning stages."""
