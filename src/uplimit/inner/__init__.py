"""The inner side: the strong model, and everything that must not leave it except coded tokens.

    scheduler  continuous batching over the strong model; what each frame carries
    scoring    best-of-N: how one candidate of a stream is picked
    runs       a stream's candidates as they run, and their audit records
    draft      the weak model as the strong model's speculative drafter
    reasoning  withheld reasoning: the splitter, and the noise that keeps sampling exact
    audit      the audit store (SQLite): everything generated, uploaded or not
    service    scheduler + frame encoder as the link's FrameSource; the generation thread
    serve      `uplimit serve inner`: connect to the outer, serve frames until SHUTDOWN
    rotation   gauged serving copies
    spotcheck  re-running streams to check them; verifier: `uplimit serve verifier`

Shares nothing with the outer side but `wire` (pyproject.toml's import contracts).
"""
