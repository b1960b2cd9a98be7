"""Small HRM configs and batches shared by the tests in this folder."""

import mlx.core as mx

from mhc_mlx.hrm import HRMConfig


def tiny_config(**overrides) -> HRMConfig:
    args = dict(
        seq_len=6,
        vocab_size=7,
        num_puzzle_identifiers=5,
        puzzle_emb_ndim=8,
        H_cycles=2,
        L_cycles=2,
        H_layers=1,
        L_layers=2,
        hidden_size=16,
        num_heads=2,
        expansion=2.0,
        ffn_multiple_of=8,
        halt_max_steps=3,
        halt_exploration_prob=0.0,
    )
    args.update(overrides)
    return HRMConfig(**args)


def random_batch(config: HRMConfig, batch_size: int = 4, seed: int = 0) -> dict:
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    return {
        "inputs": mx.random.randint(1, config.vocab_size, (batch_size, config.seq_len), key=k1),
        "labels": mx.random.randint(1, config.vocab_size, (batch_size, config.seq_len), key=k2),
        "puzzle_identifiers": mx.random.randint(0, config.num_puzzle_identifiers, (batch_size,), key=k3),
    }
