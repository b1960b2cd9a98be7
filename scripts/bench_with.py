#!/usr/bin/env python3
"""`mhc-mlx bench` with kernel settings switched first, for a side-by-side run of candidates:

    python scripts/bench_with.py kernels.DEFER_POST_X=0 coefficients.SPLIT_GLUE_SINKHORN=0 -- \
        bench --only dynamic/fwd+bwd/4096x4x4096 --out runs/bench_candidates --seeds ""

Each setting is module.ATTRIBUTE=value under mhc_mlx.kernels (kernels. for the package itself);
value 1/0/true/false/auto or an integer, or the word itself for a setting that is a word
(one_pass_vjp.FORM=split). The bench's JSON header records every kernel setting
(kernels.settings()), so a run states what it ran.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    cut = argv.index("--")
    from mhc_mlx import kernels

    try:
        kernels.assign_settings(argv[:cut])
    except ValueError as err:
        raise SystemExit(f"bench_with.py: {err}") from None
    from mhc_mlx.cli.main import main as cli

    return cli(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
