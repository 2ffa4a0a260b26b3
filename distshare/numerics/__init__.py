"""Numerics: how far results may differ, how far they do, and arithmetic that does not depend on order.

    rounding.py     every rounding bound: unit roundoff, gamma(n), reordered sums
    diff.py         differences between tensors: measured, localized, described
    per_sample.py   per-sample gradients in one fixed shape (exact mode)
    exact_sum.py    their order-independent exact sum in integers (exact mode)
"""
