"""The outer side: the OpenAI-compatible gateway, its request table and the frame decoder.

    text           tokens -> text as it can be shown (UTF-8 and stop sequences held back)
    link           the `Uplink` the service talks to: the real link (`link.outer_link`)
    service        request table, stream ids and seeds, decoded frames -> per-choice events
    app            the HTTP layer (FastAPI): OpenAI's shapes, one builder for chat and
                   completions, errors mapped once
    serve          `uplimit serve outer`: listen for the inner, serve HTTP with uvicorn
    monitor        the bits/token monitor; verifier_feed: streams to the spot-check verifier
    rollout        a weak-model rollout, outer side

Shares nothing with the inner side but `wire`; `uplimit.both` composes the two.
"""
