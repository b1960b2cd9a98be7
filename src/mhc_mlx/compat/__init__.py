"""The APIs of the seed packages, on top of mhc_mlx's math."""
