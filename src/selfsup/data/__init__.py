"""Data sets, augmentations and loaders."""
