"""A fixed-size bit set in BitTorrent order (piece 0 is the high bit of byte 0)."""

from __future__ import annotations

from collections.abc import Iterator

from p2p_common.errors import ProtocolError

# Set-bit positions (high bit first) for every byte value, for fast iteration.
_BITS_OF = [tuple(i for i in range(8) if byte & (0x80 >> i)) for byte in range(256)]
_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


def byte_length(size: int) -> int:
    """Bytes needed for ``size`` bits."""
    return (size + 7) // 8


class Bitfield:
    """``size`` bits with an O(1) count of set bits."""

    __slots__ = ("_bits", "_count", "size")

    def __init__(self, size: int, *, full: bool = False) -> None:
        if size < 0:
            raise ValueError("a bitfield cannot have a negative size")
        self.size = size
        self._bits = bytearray(byte_length(size))
        self._count = 0
        if full:
            self.set_all()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, size: int) -> Bitfield:
        """Parse a wire bitfield; the length must match and spare bits must be clear."""
        if len(data) != byte_length(size):
            raise ProtocolError(f"bitfield of {len(data)} bytes for {size} pieces")
        field = cls(size)
        field._bits[:] = data
        spare = byte_length(size) * 8 - size
        if spare and field._bits[-1] & ((1 << spare) - 1):
            raise ProtocolError("bitfield has spare bits set")
        field._count = sum(_POPCOUNT[b] for b in field._bits)
        return field

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __len__(self) -> int:
        return self.size

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.size and bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def __getitem__(self, index: int) -> bool:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def set(self, index: int) -> bool:
        """Set bit ``index``; returns True if it was clear before."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        mask = 0x80 >> (index & 7)
        byte = self._bits[index >> 3]
        if byte & mask:
            return False
        self._bits[index >> 3] = byte | mask
        self._count += 1
        return True

    def clear(self, index: int) -> bool:
        """Clear bit ``index``; returns True if it was set before."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        mask = 0x80 >> (index & 7)
        byte = self._bits[index >> 3]
        if not byte & mask:
            return False
        self._bits[index >> 3] = byte & ~mask
        self._count -= 1
        return True

    def set_all(self) -> None:
        full, rest = divmod(self.size, 8)
        self._bits[:full] = b"\xff" * full
        if rest:
            self._bits[full] = (0xFF << (8 - rest)) & 0xFF
        self._count = self.size

    @property
    def count(self) -> int:
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.size

    def __iter__(self) -> Iterator[int]:
        """Indices of the set bits, ascending."""
        for byte_index, byte in enumerate(self._bits):
            if byte:
                base = byte_index << 3
                for bit in _BITS_OF[byte]:
                    yield base + bit

    def missing(self) -> Iterator[int]:
        """Indices of the clear bits, ascending."""
        for byte_index, byte in enumerate(self._bits):
            if byte != 0xFF:
                base = byte_index << 3
                for bit in range(8):
                    index = base + bit
                    if index < self.size and not byte & (0x80 >> bit):
                        yield index

    def copy(self) -> Bitfield:
        other = Bitfield(self.size)
        other._bits[:] = self._bits
        other._count = self._count
        return other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitfield) and self.size == other.size and self._bits == other._bits

    def __hash__(self) -> int:  # pragma: no cover - mutable, like a list
        raise TypeError("Bitfield is mutable and unhashable")

    def __repr__(self) -> str:
        return f"Bitfield({self._count}/{self.size})"
