"""Every error uplimit raises, in one tree; each says whose fault it is.

    UplimitError
    ├── InvalidRequest       a client's request is invalid (its input: the API answers 400)
    ├── ConfigError          the operator's configuration or a command's arguments are invalid
    │   └── ModelPairError   strong and weak models cannot be used together
    ├── InternalError        an invariant of uplimit's own broke: a bug (500, logged with cause)
    ├── ModelFetchError      a model could not be fetched, or failed its hash check
    ├── BackendError         a model backend failed (native call returned an error)
    ├── CodecError           coded data could not be coded or decoded
    │   └── DecodeMismatch   a frame's integrity check failed: never deliver its text
    └── LinkError            the uplink must not (or cannot) carry more data
        ├── BudgetExhausted  an upload budget refused a charge; latched until an operator acts
        ├── LedgerError      the durable ledger could not check or record a charge
        ├── LinkClosed       the uplink was closed (fail closed) and sends nothing more
        ├── KernelMeterError the kernel meter (netns, veth, nftables quota) failed
        ├── ProtocolError    bytes from the peer broke the protocol: alarm, connection closed
        └── FingerprintMismatch  the sides' codec fingerprints differ: refuse to serve

Foreign exceptions are mapped once, at the boundary that calls the foreign code, with
`raise ... from`; uplimit's own are mapped once at each outer boundary (`outer.app` for HTTP,
`cli.main` for the command line). Code that parses a peer's bytes turns an InvalidRequest
raised on them into a ProtocolError: there, the peer is at fault, not a client.
"""


class UplimitError(Exception):
    """Base of every error raised by uplimit."""


class InvalidRequest(UplimitError):
    """A client's request is invalid: its sampling parameters, stream limits or messages.

    `param` names the request's field at fault, when one is (the API's error says it)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ConfigError(UplimitError):
    """Invalid configuration or arguments (the operator's, or a caller's within uplimit)."""


class InternalError(UplimitError):
    """An invariant of uplimit's own broke: a bug, never the client's or the peer's fault."""


class ModelPairError(ConfigError):
    """The strong and weak models do not share a tokenizer (or otherwise do not match)."""


class ModelFetchError(UplimitError):
    """Fetching or verifying a model failed."""


class BackendError(UplimitError):
    """A model backend failed."""


class CodecError(UplimitError):
    """Coded data could not be encoded or decoded."""


class DecodeMismatch(CodecError):
    """Decoded tokens failed the frame's integrity check."""


class LinkError(UplimitError):
    """The uplink must not, or cannot, carry more data. Every subclass means: fail closed."""


class BudgetExhausted(LinkError):
    """An upload budget refused a charge.

    `limit` names the budget ("lifetime", "per_day", "per_second"). The ledger stays
    exhausted (latched), across restarts, until an operator raises the budget.
    """

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class LedgerError(LinkError):
    """The ledger's database failed or is unfit (e.g. not durable): nothing may be sent."""


class LinkClosed(LinkError):
    """The uplink writer was closed after an error; it sends nothing more."""


class KernelMeterError(LinkError):
    """Setting up, reading or removing the kernel meter (netns, veth, nftables) failed."""


class ProtocolError(LinkError):
    """The peer sent bytes that break the link protocol; the connection is closed (fail closed)."""


class FingerprintMismatch(LinkError):
    """The two sides' codec fingerprints differ: decoding would not be exact. Refuse to serve.

    `differences` lists each differing field (`uplimit.wire.fingerprint.Difference`).
    """

    def __init__(self, message: str, differences: list) -> None:
        super().__init__(message)
        self.differences = differences
