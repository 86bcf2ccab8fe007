"""Exception types: every user-facing failure names its problem through one of these."""

from __future__ import annotations


class BlackboxProxyError(Exception):
    """Base class of all errors raised by blackbox-proxy."""


class InputError(BlackboxProxyError, ValueError):
    """Bad input from the caller: empty prompt, empty choices, NaN scores, bad flag values..."""


class CandidateError(InputError):
    """A candidate cannot be scored as asked (e.g. not a single token in strict mode)."""


class VocabularyMismatchError(InputError):
    """Models that must share a vocabulary do not."""


class MissingLogprobsError(BlackboxProxyError):
    """A provider returned no (or unusable) log-probs."""


class MissingCandidateError(BlackboxProxyError):
    """A candidate is absent from the base's top-k and the policy is ``error``."""


class ProviderError(BlackboxProxyError):
    """A provider request failed for good (after retries), or the server is unreachable."""


class ModelSpecError(BlackboxProxyError, ValueError):
    """A model spec could not be resolved to weights (unknown name, missing file, bad checksum)."""


class ChecksumError(ModelSpecError):
    """A model file's sha256 differs from the expected one."""
