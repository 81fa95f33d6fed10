"""The exceptions ``lmstrain.lms`` raises; each message says what was wrong and how to fix it."""


class LMSError(Exception):
    """Base class of every error the swap engine raises on purpose."""


class LMSParameterError(LMSError, ValueError):
    """An LMS setting has a value it cannot take; ``key`` names the setting (or is None)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class BoundExceededError(LMSParameterError):
    """No swap plan fits the budget.

    ``bound_bytes`` is the physical bound (weights, optimizer state, gradients and the working
    set of ``bound_op``, the op that needs most on its own); when it exceeds ``budget_bytes``
    (:attr:`single_op`), no plan can help. Otherwise swapping every eligible tensor still needs
    ``best_bytes``.
    """

    def __init__(self, message: str, *, bound_op: str, bound_bytes: int, budget_bytes: int,
                 best_bytes: int | None = None):
        super().__init__(message)
        self.bound_op, self.bound_bytes = bound_op, bound_bytes
        self.budget_bytes, self.best_bytes = budget_bytes, best_bytes

    @property
    def single_op(self) -> bool:
        """True when one op with the resident state alone does not fit the budget."""
        return self.bound_bytes > self.budget_bytes


class SwapCycleError(LMSError):
    """Applying the swap plan would make the traced step wait for itself."""
