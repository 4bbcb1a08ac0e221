"""What both sides agree on, sans-IO: the bytes on the link and the rules both apply.

    request      GenerationRequest (what goes down per stream), its limits, seeds, withheld ids
    stops        StopMatcher: stop sequences, matched alike on both sides
    streams      the stream table both sides keep, and when a stream ends without a word
    frame        the coded frame: its grammar, encoder and decoder, how its bits are shared
    parsing      varints, a message-body cursor and the parser base of the formats below
    protocol     the link's two byte streams: messages, encoders, strict parsers
    receiver     the outer's uplink state machine (frames in, decoded frames and alarms out)
    fingerprint  what both sides compare before they serve
    checks       the CHECK message to the spot-check verifier, and which streams get checked

No socket, asyncio, sqlite3 or subprocess here (pyproject.toml's import contracts).
"""
