"""Integrity: is the training state what it should be, on every rank and on disk?

    fingerprint.py     128-bit digests of tensors and of a whole training state
    dsh128.py          the device digest's specification (torch reference); dsh128_triton.py its kernel
    state.py           what "the training state" is: every tensor, under stable names
    replicas.py        the cross-rank comparison (a collective) and its report
    rolling.py         a rolling digest for every-step checks: one slice per step, all within N
    diagnosis.py       why replicas differ: the likely cause, from what differs, how and when
    wrapper_facts.py   what a DDP wrapper says about the model it wraps (evidence for a diagnosis)
    watch.py           `distshare.watch`: the checks placed in a user's loop by hooks
    checkpoint/        verified checkpoints: write, read, verify, compare
    resume.py          which checkpoint a run may continue from, and RNG states
"""
