"""The images: scanning a folder into labelled files and a stable split, the one decode and resize path, augmentation."""
