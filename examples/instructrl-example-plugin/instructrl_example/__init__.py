"""An example instructrl plugin package."""
