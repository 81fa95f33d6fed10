"""Click parameter types for lmstrain's options: sizes, ranges and lists, parsed once at the
edge so the library receives numbers."""

import click

from lmstrain.errors import UserError
from lmstrain.units import parse_bytes


class ByteSize(click.ParamType):
    """A size such as 16GiB, 512MiB, 40GB or a number of bytes."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            size = parse_bytes(value)
        except UserError as error:
            self.fail(str(error), param, ctx)
        if size <= 0:
            self.fail(f"expected a positive size such as 16GiB, got {value!r}", param, ctx)
        return size


class ListOf(click.ParamType):
    """Comma-separated values of another type, sorted and without repeats
    (``"1,2,4"``, ``"256MiB,512MiB"``)."""

    def __init__(self, item: click.ParamType, example: str):
        self.item, self.example = item, example
        self.name = f"{item.name}[,{item.name}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail(f"expected comma-separated values such as {self.example}, got {value!r}",
                      param, ctx)
        return sorted({self.item.convert(v, param, ctx) for v in items})


class SizeRange(click.ParamType):
    """``FROM:TO:STEP`` (inclusive), or a single size: ``"64:192:16"`` -> 64, 80, ..., 192."""

    name = "FROM:TO:STEP"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        usage = f"expected FROM:TO:STEP (e.g. 64:192:16) or one size, got {value!r}"
        try:
            numbers = [int(p) for p in str(value).split(":")]
        except ValueError:
            self.fail(usage, param, ctx)
        if len(numbers) == 1:
            numbers = [numbers[0], numbers[0], 1]
        if len(numbers) != 3:
            self.fail(usage, param, ctx)
        low, high, step = numbers
        if low <= 0 or step <= 0 or high < low:
            self.fail(f"{value}: need 0 < FROM <= TO and STEP > 0", param, ctx)
        return list(range(low, high + 1, step))


POSITIVE_INTS = ListOf(click.IntRange(1), "1,2,4")
BYTE_SIZES = ListOf(ByteSize(), "256MiB,512MiB")
