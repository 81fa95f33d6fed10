"""TensorFlow's best-fit-with-coalescing (BFC) allocator, replayed on an allocation sequence.

``get_memory_info()["peak"]`` is the BFC allocator's ``peak_bytes_in_use``: the largest sum of
the chunks handed out, not of the bytes requested. A request is rounded up to 256 bytes and
served from the smallest free chunk that fits (ties: lowest address); the chunk is split only
when it is at least twice the request or the rest is at least 128 MiB, so a 2 MiB tensor can
occupy a 3 MiB chunk. Freed chunks merge with free neighbours. When nothing fits, a new region
is added: on a GPU the first region is the whole memory limit; with ``allow_growth`` (TF's CPU
BFC allocator) regions start at 2 MiB and double. Following ``tsl/framework/bfc_allocator.cc``.
"""

from bisect import bisect_left, insort
from dataclasses import dataclass

MIN_ALLOCATION = 256
NUM_BINS = 21
MAX_INTERNAL_FRAGMENTATION = 128 * 2**20
INITIAL_GROWTH_REGION = 2 * 2**20
REGION_GAP = 2**44  # synthetic address distance between regions


class OutOfMemory(Exception):
    """No free chunk and no room for a new region (TensorFlow's ResourceExhaustedError)."""


@dataclass
class Chunk:
    address: int
    size: int
    region: int
    free: bool = True
    prev: "Chunk" = None
    next: "Chunk" = None


def rounded(size):
    return -(-max(size, 1) // MIN_ALLOCATION) * MIN_ALLOCATION


def bin_for(size):
    """Bin ``i`` holds free chunks of 256 * 2**i bytes up to twice that (the last: larger)."""
    return min(NUM_BINS - 1, (max(size, MIN_ALLOCATION) // MIN_ALLOCATION).bit_length() - 1)


class BFCAllocator:
    """Chunks, bins and regions of one allocator; sizes in bytes."""

    def __init__(self, limit, allow_growth):
        self.limit = limit
        self.region_size = rounded(min(limit, INITIAL_GROWTH_REGION)) if allow_growth \
            else rounded(limit)
        self.regions = 0
        self.region_bytes = 0
        self.bins = [[] for _ in range(NUM_BINS)]  # sorted (size, address, chunk id)
        self.chunks = {}
        self.in_use = 0
        self.peak = 0

    def allocate(self, size):
        """The chunk serving a request of ``size`` bytes (raises :class:`OutOfMemory`)."""
        size = rounded(size)
        chunk = self._find(size)
        if chunk is None:
            self._extend(size)
            chunk = self._find(size)
            if chunk is None:
                raise OutOfMemory(size)
        self.in_use += chunk.size
        self.peak = max(self.peak, self.in_use)
        return chunk

    def free(self, chunk):
        self.in_use -= chunk.size
        chunk.free = True
        for neighbour in (chunk.next, chunk.prev):
            if neighbour is not None and neighbour.free:
                self._unbin(neighbour)
                first, second = (chunk, neighbour) if neighbour is chunk.next \
                    else (neighbour, chunk)
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                del self.chunks[id(second)]
                chunk = first
        self._bin(chunk)

    def _find(self, size):
        for index in range(bin_for(size), NUM_BINS):
            entries = self.bins[index]
            at = bisect_left(entries, (size, -1, 0))
            if at < len(entries):
                chunk = self.chunks[entries.pop(at)[2]]
                chunk.free = False
                if chunk.size >= 2 * size or chunk.size - size >= MAX_INTERNAL_FRAGMENTATION:
                    self._split(chunk, size)
                return chunk
        return None

    def _split(self, chunk, size):
        rest = Chunk(chunk.address + size, chunk.size - size, chunk.region, True, chunk,
                     chunk.next)
        if chunk.next is not None:
            chunk.next.prev = rest
        chunk.next, chunk.size = rest, size
        self.chunks[id(rest)] = rest
        self._bin(rest)

    def _extend(self, size):
        available = (self.limit - self.region_bytes) // MIN_ALLOCATION * MIN_ALLOCATION
        if size > available:
            raise OutOfMemory(size)
        grown = False
        while size > self.region_size:
            self.region_size *= 2
            grown = True
        region = min(self.region_size, available)
        if not grown:
            self.region_size *= 2
        chunk = Chunk(self.regions * REGION_GAP, region, self.regions)
        self.regions += 1
        self.region_bytes += region
        self.chunks[id(chunk)] = chunk
        self._bin(chunk)

    def _bin(self, chunk):
        insort(self.bins[bin_for(chunk.size)], (chunk.size, chunk.address, id(chunk)))

    def _unbin(self, chunk):
        entries = self.bins[bin_for(chunk.size)]
        entries.pop(bisect_left(entries, (chunk.size, chunk.address, id(chunk))))


def replay(events, resident, limit, allow_growth, steps=3):
    """Peak device bytes in use during the last of ``steps`` identical steps.

    ``resident``: sizes allocated before the first step and never freed (weights, optimizer
    state, the batch). ``events``: one step's ``(allocate, buffer, bytes, on_device)`` in
    order; host buffers share the allocator (as on a CPU split into device and host) but are
    not counted. Raises :class:`OutOfMemory` when a request cannot be served within ``limit``.
    """
    allocator = BFCAllocator(limit, allow_growth)
    device = sum(allocator.allocate(size).size for size in resident if size)
    peak = device
    for step in range(steps):
        live, peak = {}, device
        for allocate, buffer, size, on_device in events:
            if not size:
                continue
            if allocate:
                chunk = allocator.allocate(size)
                live[buffer] = (chunk, on_device)
                device += chunk.size if on_device else 0
                peak = max(peak, device)
            elif buffer in live:
                chunk, counted = live.pop(buffer)
                device -= chunk.size if counted else 0
                allocator.free(chunk)
        for chunk, counted in live.values():
            device -= chunk.size if counted else 0
            allocator.free(chunk)
    return peak
