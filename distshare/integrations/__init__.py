"""Integrations: distshare's replica checks where users already train.

Each module imports its third-party package itself (lazily where it is optional), so
importing `distshare.integrations` imports none of them:

- `distshare.integrations.accelerate`: a helper for a plain `accelerate` loop;
- `distshare.integrations.hf_trainer`: `DistshareCallback`, a transformers `TrainerCallback`;
- `distshare.integrations.lightning_callback`: `DistshareLightningCallback`, a Lightning
  `Callback` (`pip install distshare[lightning]`);
- `distshare.integrations.options`: the options they share, refused in one line when wrong.

Each checks, every N optimizer steps, that every rank holds the same training state
(parameters, buffers, optimizer state) and stops the run with the diagnosis when not.
"""
