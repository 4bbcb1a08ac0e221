"""The uplink's security boundary: budgets, the durable ledger, meters, the kernel quota.

    budget   sans-IO: budgets, the charge decision, the timing-channel charge
    ledger   durable ledger (SQLite file, or PostgreSQL for a budget shared by links)
    meter    MeteredWriter (the inner's only way to write the uplink), the outer's own count
    kernel   network namespace + veth + nftables quota around the inner side

docs/link.md has the threat model and the arguments.
"""
