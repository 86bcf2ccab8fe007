"""Exception types: every user-facing failure names its problem through one of these."""

from __future__ import annotations

import os


class BlackboxProxyError(Exception):
    """Base class of all errors raised by blackbox-proxy."""


class InputError(BlackboxProxyError, ValueError):
    """Bad input from the caller: empty prompt, empty choices, NaN scores, bad flag values..."""


class CandidateError(InputError):
    """A candidate cannot be scored as asked (e.g. not a single token in strict mode)."""


class DatasetError(InputError):
    """A dataset file is missing or malformed (the message names the file and record)."""


class VocabularyMismatchError(InputError):
    """Models that must share a vocabulary do not."""


class MissingLogprobsError(BlackboxProxyError):
    """A provider returned no (or unusable) log-probs.

    ``transient`` (default True) tells the transport that asking again may help (a proxy or an
    overloaded server dropped them); pass ``transient=False`` where the same request is certain
    to come back the same (e.g. the model ends its output at once at temperature 0).
    """

    def __init__(self, *args: object, transient: bool = True) -> None:
        super().__init__(*args)
        self.transient = transient


class MissingCandidateError(BlackboxProxyError):
    """A candidate is absent from the base's top-k and the policy is ``error``."""


class ProviderError(BlackboxProxyError):
    """A provider request failed (after the transport's retries, where retrying could help).

    The transport fills ``status`` (HTTP status or None), ``attempts`` (HTTP requests sent),
    ``base_url``, ``model`` and ``reason`` (a short word: "rate-limited", "server-error",
    "timeout", "malformed", "missing-logprobs", "auth", "not-found", "rejected", "unreachable",
    "hanging"). Messages never hold the API key, and no exception from the HTTP client is kept
    as ``__cause__`` or ``__context__`` (it could hold a key a server echoed back).
    """

    status: int | None = None
    attempts: int = 0
    base_url: str = ""
    model: str = ""
    reason: str = ""


class TransientProviderError(ProviderError):
    """A fault that can pass (429, 5xx, timeout, malformed body, missing log-probs) outlasted every retry.

    Nothing usable was bought: record the question as an error that a resume asks again, and go on.
    """


class TransientMissingLogprobsError(TransientProviderError, MissingLogprobsError):
    """Every retry came back without the log-probs asked for (also a :class:`MissingLogprobsError`)."""


class FatalProviderError(ProviderError):
    """A failure retrying cannot mend: bad key (401/403), unknown model (404), unreachable or hanging
    server, a server that never returns log-probs. Stop the run and say so in one line."""


class LogprobsUnsupportedError(FatalProviderError, MissingLogprobsError):
    """The server answered every attempt without the log-probs asked for and has never returned any:
    it or the model does not support them (also a :class:`MissingLogprobsError`)."""


class RequestRejectedError(FatalProviderError):
    """The server refused this one request (400, 413, 422, other 4xx): asking again gets the same answer.

    Permanent for this request only: record the question as a permanent error (naming it) and go on;
    stop only when every request is refused.
    """


class MalformedResponseError(ProviderError):
    """A 200 whose body is not the JSON the protocol promises (truncated, not JSON, no choices).

    Raised by parsers; the transport treats it as transient and retries.
    """


class CacheError(InputError):
    """The response cache file cannot be used (a folder, not SQLite, read-only, another schema, disk full)."""


class ModelSpecError(BlackboxProxyError, ValueError):
    """A model spec could not be resolved to weights (unknown name, missing file, bad checksum)."""


class ChecksumError(ModelSpecError):
    """A model file's sha256 differs from the expected one."""


class RunStopped(Exception):
    """A run ended by a :class:`~blackbox_proxy.evaluation.runner.StopRequest` (Ctrl-C, SIGTERM); ``str()`` is the one line saying what was kept."""

    def __init__(
        self,
        reason: str,
        *,
        in_flight: int,
        kept: int,
        abandoned: int,
        waited: float,
        finished: int,
        total: int,
        stored: int,
        run_dir: os.PathLike[str] | str | None,
    ) -> None:
        self.reason, self.in_flight, self.kept, self.abandoned = reason, in_flight, kept, abandoned
        self.waited, self.finished, self.total, self.stored = waited, finished, total, stored
        self.run_dir = run_dir
        if run_dir is None:
            msg = (
                f"stopped ({reason}) after {finished} of {total} questions; nothing was stored "
                "(give --out or --run-dir to make a run resumable)"
            )
        else:
            lost = (
                f", {abandoned} abandoned after {waited:.1f} s (asked again on resume)" if abandoned else ""
            )
            msg = (
                f"stopped ({reason}): kept {kept} of the {in_flight} base answers in flight{lost}; "
                f"{finished} of {total} questions finished, {stored} base answers stored in {run_dir}; "
                "re-run the same command to resume"
            )
        super().__init__(msg)
