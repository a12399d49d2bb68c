"""What a client may put on the wire, checked frame by frame (RFC 6455 5.2, 5.4, 5.5.1, 7.4,
8.1). Sans-I/O: frames in, complete messages or verdicts out; the connection acts on them.

picows already refuses unknown opcodes, unmasked or fragmented control frames, control
payloads over 125 bytes, bad length encodings, close codes below 3000 that no RFC defines,
and frames over ``--max-frame-size``. What is left to us: the reserved bits, the order of
fragments, UTF-8 (checked as the bytes arrive, so a bad byte fails the connection at once,
not when the message ends), the size of a reassembled message, and the two close codes
picows lets through although no peer may send them.
"""

from __future__ import annotations

import codecs
from typing import Final

PROTOCOL_ERROR: Final = 1002
INVALID_TEXT: Final = 1007

# Close codes a peer may send (RFC 6455 7.4.1 and the IANA registry): the defined ones,
# and 3000-4999 (libraries, frameworks, applications). 1004-1006 and 1015 are reserved.
_VALID_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def close_code_valid(code: int) -> bool:
    return code in _VALID_CLOSE or 3000 <= code <= 4999


class Violation(Exception):
    """The peer broke the protocol: fail the connection with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


def check_utf8(payload: bytes) -> None:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Violation(INVALID_TEXT, f"invalid UTF-8 at byte {exc.start}") from None


class TooLarge:
    """A fragmented message passed the message limit: answer it once; the rest of its
    fragments are read and dropped."""


TOO_LARGE: Final = TooLarge()
Message = tuple[bytes, bool]  # payload, binary
Fed = Message | TooLarge | None


class Assembler:
    """One connection's message in progress. ``feed`` takes each data frame (text, binary,
    continuation) and returns a whole message, ``None`` (more fragments to come), or
    ``TOO_LARGE``; it raises Violation for what must close the connection.

    At most ``limit`` bytes of a fragmented message are kept (a connection pins no more than
    that between frames). A message that fits in one frame is returned whatever its size
    (picows bounded it by the frame limit): the node answers ``too_large`` itself."""

    __slots__ = ("_binary", "_buf", "_decoder", "_dropping", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf: bytearray | None = None  # the fragments so far (None: no message open)
        self._binary = False
        self._decoder: codecs.IncrementalDecoder | None = None  # text: checks as it goes
        self._dropping = False  # over the limit: fragments are dropped until the final one

    @property
    def open(self) -> bool:
        """A fragmented message is unfinished."""
        return self._buf is not None or self._dropping

    def feed(self, opcode: int, fin: bool, payload: bytes | memoryview) -> Fed:
        if opcode == 0:
            return self._continue(fin, payload)
        if self.open:
            raise Violation(PROTOCOL_ERROR, "new message inside a fragmented one")
        binary = opcode == 2
        if fin:
            data = bytes(payload)
            if not binary:
                check_utf8(data)
            return data, binary
        self._binary = binary
        self._decoder = None if binary else codecs.getincrementaldecoder("utf-8")()
        self._buf = bytearray()
        return self._add(fin, payload)

    def _continue(self, fin: bool, payload: bytes | memoryview) -> Fed:
        if self._dropping:
            self._dropping = not fin
            return None
        if self._buf is None:
            raise Violation(PROTOCOL_ERROR, "continuation frame without a message")
        return self._add(fin, payload)

    def _add(self, fin: bool, payload: bytes | memoryview) -> Fed:
        buf = self._buf
        assert buf is not None
        if len(buf) + len(payload) > self.limit:
            self.reset()
            self._dropping = not fin
            return TOO_LARGE
        decoder = self._decoder
        if decoder is not None:
            try:
                decoder.decode(payload, fin)
            except UnicodeDecodeError as exc:
                at = len(buf) + exc.start
                self.reset()
                raise Violation(INVALID_TEXT, f"invalid UTF-8 at byte {at}") from None
        buf += payload
        if not fin:
            return None
        self._buf = self._decoder = None
        return bytes(buf), self._binary

    def reset(self) -> None:
        """Forget the message in progress (and free its bytes)."""
        self._buf = self._decoder = None
        self._dropping = False
