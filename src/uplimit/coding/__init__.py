"""The codec: exact integer contracts both sides compute alike, and no I/O.

    arith        the arithmetic coder (exact integer intervals)
    freqs        weak-model logits -> exact integer frequency tables
    noise        the per-position Gumbel noise both sides derive from the outer's seed
    sampling     SamplingParams, and sampling a token with that noise
    codec        one token: the decoder's guess, its hit flag, the miss distribution
    calibration  the fitted hit probabilities and miss temperature, shipped per model pair
    generate     the plain batched sampling loop (bench, calibrate, distill, the verifier),
                 and `Finish`, why a generation ended

Imports models' interface only; never a socket, asyncio, sqlite3 or a subprocess
(pyproject.toml's import contracts).
"""
