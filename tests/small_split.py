"""The run the engine, resume and restart tests share: small and quick, but a real split.

G = 16 = W 2 x k 2 x b 4 in float64 (Adam's moments in play), on 160 generated sentences:
10 global batches per epoch, nothing dropped.
"""

SMALL_SPLIT = [
    "--set",
    "plan.global_batch=16",
    "--set",
    "plan.accum_steps=2",
    "--set",
    "data.num_samples=160",
    "--set",
    "model.dtype=float64",
]
