"""What can go wrong in a secure-aggregation session, as exception types.

The types say who should act: a :class:`RejectedMessage` is dropped and its sender treated
as absent (the session goes on); a :class:`CellAborted` ends one cell's session without
releasing anything (other cells go on); :class:`ShareRequestRefused` is a client protecting
itself; :class:`UnsafeEncoding` and :class:`ProtocolStateError` are configuration or
programming errors to fix, not to retry.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation error."""


class RejectedMessage(SecAggError):
    """A message failed a check (signature, session id, sender, shape, duplicate, decryption).

    The receiver ignores the message; its state is exactly as if it had never arrived.
    """


class UnknownDevice(RejectedMessage):
    """The sender (or a device a message vouches for) is not in the cloud's registry."""


class ShareRequestRefused(SecAggError):
    """An unmask request would make a client reveal both secrets (self-mask seed and mask
    key) of the same peer, which would expose that peer's input; the client aborts."""


class ProtocolStateError(SecAggError):
    """A role was asked to do a stage out of order (e.g. upload before sharing keys)."""


class UnsafeEncoding(SecAggError, ValueError):
    """An encoding whose sum could wrap around in Z_2^32 for the given number of summands."""


class CellAborted(SecAggError):
    """One cell's session cannot finish safely; nothing from it is released.

    ``stage`` is where it stopped and ``reason`` says exactly what was missing.
    """

    def __init__(self, cell: str, stage: str, reason: str):
        super().__init__(f"cell {cell!r} aborted at {stage}: {reason}")
        self.cell = cell
        self.stage = stage
        self.reason = reason
