"""One module per dashboard tab; each has a `render(...)`."""
