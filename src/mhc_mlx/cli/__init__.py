"""Command-line tools: `mhc-mlx <command>`; each command lives in its own module here."""
