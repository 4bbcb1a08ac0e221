"""The link's two TCP connections: thin asyncio shells around `wire.protocol` / `wire.receiver`.

Each end has a module of its own: `link.inner_link` (`InnerLink`, `serve_frames`) and
`link.outer_link` (`OuterLink`); what they share is here.

    inner                                            outer (listens on two ports)
    InnerLink.connect ---- downlink connection ----> OuterLink   challenge, proof, preamble,
                                                                 HELLO, OPEN_STREAM,
                     <--- (outer -> inner only) ---              CANCEL, RESEND, SHUTDOWN,
                                                                 MODEL_OFFER/DATA, SWITCH
                      ---- uplink connection ------> OuterLink   proof, verdict, frames, END
                           (MeteredWriter only)

Handshake: the inner connects the downlink and reads the outer's challenge; it connects the
uplink (`MeteredWriter.connect`, which charges the connection) and proves it holds the link's
secret there (charged); the outer answers with its own proof, then its fingerprint (HELLO)
(`link.auth`: until that proof a downlink holds no slot, and connections come only from the
inner's configured addresses). The inner checks the outer's proof and sends its verdict:
accept, or refuse naming the fields that differ (`wire.fingerprint`).

The inner's rules are in `link.inner_link`'s docstring, the outer's in `link.outer_link`'s.
"""

__all__ = ["HANDSHAKE_TIMEOUT_S", "READ_BYTES"]

HANDSHAKE_TIMEOUT_S = 30.0  # connect, HELLO and verdict; longer means a peer is stuck
READ_BYTES = 1 << 16  # one read from a connection at most
