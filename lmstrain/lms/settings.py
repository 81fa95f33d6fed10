"""The swap settings: what to swap and when. Declared once here, with their checks and help
texts; the ``LMS`` callback, the planner, the simulator and the app's config (``lms.*`` keys)
all take them from :class:`SwapSettings`."""

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from lmstrain.lms.errors import LMSParameterError

SYNC_MODES = ("async", "swapout", "swapin", "both")
RECOMPUTE_MODES = ("none", "cheap", "auto")
UPDATE_ORDERS = ("early", "tensorflow")
SyncMode = Literal["async", "swapout", "swapin", "both"]
SYNC_SWAPOUT = frozenset({"swapout", "both"})
SYNC_SWAPIN = frozenset({"swapin", "both"})
COPY_MODES = ("snapshot", "deepcopy")
AUTO_HINT = " Negative values do not mean 'automatic': that will be autotune=True."


def _setting(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True)
class SwapSettings:
    """What to swap and when; each field's ``help`` metadata says what it means."""

    min_tensor_bytes: int = _setting(4096, "Smallest activation that is swapped, in bytes.",
                                     min=0, unit="bytes")
    swapout_threshold: int = _setting(
        1, "Swap a tensor only if at least this many ops run between its producer and its first "
           "backward consumer (topological levels).", min=0, unit="levels")
    swapin_ahead: int = _setting(
        1, "Prefetch distance: start the swap-in this many backward levels before the consumer.",
        min=1, unit="levels before the consumer")
    swapin_groupby: int = _setting(
        0, "Merge swap-ins whose consumers are within this many levels.", min=0, unit="levels")
    sync_mode: SyncMode = _setting(
        "swapout", "Extra waits: forward consumers wait for the swap-out (swapout), the consumer "
                   "waits for the swap-in (swapin), both, or none (async).")
    include_types: tuple[str, ...] = _setting(
        (), "Only swap outputs of these op types (empty = all).")
    exclude_types: tuple[str, ...] = _setting((), "Never swap outputs of these op types.")
    include_scopes: tuple[str, ...] = _setting(
        (), "Only swap outputs of ops under these name scopes.")
    exclude_scopes: tuple[str, ...] = _setting(
        (), "Never swap outputs of ops under these name scopes.")
    recompute: Literal["none", "cheap", "auto"] = _setting(
        "none", "cheap: instead of swapping the output of cheap element-wise ops (normalisation "
                "arithmetic, activations, adds, reshapes), recompute it in the backward pass "
                "from a tensor that is swapped in anyway; none: swap it; auto: auto-tune "
                "searches both ways, holding recomputing plans to a margin under the budget, "
                "and keeps the one that copies fewer bytes (needs autotune).")
    update_order: Literal["early", "tensorflow"] = _setting(
        "early", "early: each weight's optimizer update runs as soon as the backward pass is "
                 "done with the weight, freeing its gradient; tensorflow: when TensorFlow's "
                 "executor gets to it (on a CPU, often at the end of the backward pass).")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is int:
                _check_int(f.name, value, f.metadata["min"], f.metadata["unit"],
                           "" if f.name == "min_tensor_bytes" else AUTO_HINT)
            elif f.name == "sync_mode":
                check_choice("sync_mode", value, SYNC_MODES)
            elif f.name == "recompute":
                check_choice("recompute", value, RECOMPUTE_MODES)
            elif f.name == "update_order":
                check_choice("update_order", value, UPDATE_ORDERS)
            else:
                object.__setattr__(self, f.name, _names(f.name, value))

    @classmethod
    def from_mapping(cls, values: dict) -> "SwapSettings":
        """Settings from a mapping that may hold other keys too (e.g. a config's ``lms``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _check_int(name: str, value: Any, minimum: int, unit: str, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LMSParameterError(
            f"LMS {name} must be an integer >= {minimum} ({unit}); got {value!r}.{hint}",
            key=name)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise :class:`LMSParameterError` unless ``value`` is one of ``allowed``."""
    if not any(value is a or (value == a and type(value) is type(a)) for a in allowed):
        raise LMSParameterError(
            f"LMS {name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.",
            key=name)


def _names(name: str, value: Any) -> tuple[str, ...]:
    """A tuple of strings from a string or a sequence of strings."""
    if isinstance(value, str):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        items = None
    if items is None or not all(isinstance(v, str) and v for v in items):
        raise LMSParameterError(
            f"LMS {name} must be a list of non-empty strings; got {value!r}.", key=name)
    return items
