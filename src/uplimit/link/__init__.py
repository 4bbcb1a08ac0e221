"""The uplink's security boundary: budgets, the durable ledger, meters, the kernel quota.

    budget      sans-IO: budgets, the charge decision, the timing-channel charge
    ledger      durable ledger (SQLite file, or PostgreSQL for a budget shared by links)
    meter       MeteredWriter (the inner's only way to write the uplink), the outer's own count
    kernel      network namespace + veth + nftables quota around the inner side
    transport   the link's two TCP connections, drawn once; what both ends share
    auth        the link's authentication: shared secret, challenge-response, inner addresses
    inner_link  the inner's end: InnerLink, serve_frames (END reserve), the downlink log
    rollout     the receiving end of a weak-model rollout (an inner's, a relay's): check, switch
    outer_link  the outer's end: OuterLink (receiver, counter and its budget, resends)
    alarms      one alarm record and hook for the ledger and both ends
    memory      both ends' connections in memory, no sockets (the service tests)
    agreement   the three meters side by side (`uplimit meters`)
    metrics     the outer's Prometheus metrics and their exposition

No model types here but in `rollout`, which loads and checks the model it was sent; the outer's
end switches its decoder through a callable it is given.
docs/link.md has the threat model and the arguments.
"""
