"""The swap settings shared by the callback, the planner and the plan report, validated."""

from dataclasses import asdict, dataclass

from lmstrain.errors import UserError

SYNC_MODES = ("async", "swapout", "swapin", "both")
SYNC_SWAPOUT = frozenset({"swapout", "both"})
SYNC_SWAPIN = frozenset({"swapin", "both"})
COPY_MODES = ("snapshot", "deepcopy")
AUTO_HINT = " Negative values do not mean 'automatic': that will be autotune=True."


class LMSParameterError(UserError, ValueError):
    """An LMS setting has a value it cannot take; the message says what is allowed."""


@dataclass(frozen=True)
class SwapSettings:
    """What to swap and when; see :class:`lmstrain.lms.LMS` for the meaning of each field."""

    min_tensor_bytes: int = 4096
    swapout_threshold: int = 1
    swapin_ahead: int = 1
    swapin_groupby: int = 0
    sync_mode: str = "swapout"
    include_types: tuple = ()
    exclude_types: tuple = ()
    include_scopes: tuple = ()
    exclude_scopes: tuple = ()

    def __post_init__(self):
        _check_int("min_tensor_bytes", self.min_tensor_bytes, 0, "bytes")
        _check_int("swapout_threshold", self.swapout_threshold, 0, "levels", AUTO_HINT)
        _check_int("swapin_ahead", self.swapin_ahead, 1, "levels before the consumer", AUTO_HINT)
        _check_int("swapin_groupby", self.swapin_groupby, 0, "levels", AUTO_HINT)
        check_choice("sync_mode", self.sync_mode, SYNC_MODES)
        for name in ("include_types", "exclude_types", "include_scopes", "exclude_scopes"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_int(name, value, minimum, unit, hint=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LMSParameterError(
            f"LMS {name} must be an integer >= {minimum} ({unit}); got {value!r}.{hint}")


def check_choice(name, value, allowed):
    if value not in allowed:
        raise LMSParameterError(
            f"LMS {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def _names(name, value):
    """A tuple of strings from a string or a sequence of strings."""
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) and v for v in items):
        raise LMSParameterError(
            f"LMS {name} must be a list of non-empty strings; got {value!r}.")
    return items
