"""Red-team mode: a deliberately dishonest inner side, for `uplimit redteam` only.

Nothing here is reachable from `uplimit serve` or its configuration: the attacks are built
and run by `redteam.run.run_redteam` against a live system on loopback, each on its own
fresh link, ledger and budget. See docs/security.md.
"""
