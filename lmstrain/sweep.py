"""``lmstrain maxres``: the largest trainable image size (or batch) per memory budget.

For each device-memory budget, batch size and swap setting the search walks a list of
candidate shapes, starting where the simulator predicts the limit, and runs real training
trials (each in its own subprocess, see :mod:`lmstrain.trial`) until it has found the largest
shape that trains *and* has seen the next larger one fail. Every trial is stored as a JSON file
under ``<out>/trials/``, so an interrupted sweep resumes without redoing finished trials.
"""

from dataclasses import asdict, dataclass, field

from lmstrain.errors import UserError

STATUSES = ("ok", "oom", "crash", "timeout")


@dataclass(frozen=True)
class TrialSpec:
    """One training trial: a shape, a batch size, swapping on or off, a memory budget."""

    shape: tuple
    batch: int
    lms: bool
    device_memory_bytes: int

    @property
    def size(self):
        return max(self.shape)

    @property
    def key(self):
        """A file-name-safe identifier."""
        return (f"mem{self.device_memory_bytes}-b{self.batch}-{'lms' if self.lms else 'nolms'}-"
                + "x".join(map(str, self.shape)))


@dataclass
class Trial:
    """A finished trial: its spec, what happened and what was measured."""

    shape: list
    size: int
    batch: int
    lms: bool
    device_memory_bytes: int
    status: str
    reason: str = ""
    measured_peak_bytes: int = None
    step_time_s: float = None
    predicted_peak_bytes: int = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status == "ok"

    def to_dict(self):
        return asdict(self)


def parse_sizes(text):
    """``"64:192:16"`` -> ``[64, 80, ..., 192]`` (inclusive); a single number is one size."""
    parts = str(text).split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"--sizes expects FROM:TO:STEP (e.g. 64:192:16), got {text!r}") from None
    if len(numbers) == 1:
        numbers = [numbers[0], numbers[0], 1]
    if len(numbers) != 3:
        raise UserError(f"--sizes expects FROM:TO:STEP (e.g. 64:192:16), got {text!r}")
    low, high, step = numbers
    if low <= 0 or step <= 0 or high < low:
        raise UserError(f"--sizes {text}: need 0 < FROM <= TO and STEP > 0")
    return list(range(low, high + 1, step))


def parse_int_list(text, option):
    """``"1,2,4"`` -> ``[1, 2, 4]`` (positive integers)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} expects comma-separated positive integers, got {text!r}") \
            from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"{option} expects comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def scaled_shapes(base_shape, sizes, divisor):
    """Shapes with the aspect of ``base_shape`` whose largest edge is each of ``sizes``.

    Each axis is rounded down to a multiple of ``divisor`` (at least ``divisor``); sizes that
    round to the same shape appear once. Returns ``[(largest_edge, shape), ...]`` ascending.
    """
    largest = max(base_shape)
    shapes = {}
    for size in sizes:
        shape = tuple(max(divisor, int(edge * size / largest) // divisor * divisor)
                      for edge in base_shape)
        shapes.setdefault(shape, max(shape))
    return sorted(((edge, shape) for shape, edge in shapes.items()), key=lambda x: x[0])


def search_largest(candidates, run, start=0):
    """Find the largest candidate ``run`` accepts, starting the walk at index ``start``.

    ``candidates`` are ordered from smallest to largest and ``run(candidate)`` returns a
    :class:`Trial`. Trials are assumed monotonic (if a candidate fails, larger ones fail).
    The search always runs the candidate one step above the largest one that passed, when
    there is one, so every reported maximum is confirmed by a failure.
    Returns ``(index of the largest passing candidate or None, trials run in order)``.
    """
    if not candidates:
        return None, []
    trials = []

    def attempt(index):
        trial = run(candidates[index])
        trials.append(trial)
        return trial.ok

    index = min(max(start, 0), len(candidates) - 1)
    if attempt(index):
        while index + 1 < len(candidates) and attempt(index + 1):
            index += 1
        return index, trials
    while index > 0:
        index -= 1
        if attempt(index):
            return index, trials
    return None, trials
