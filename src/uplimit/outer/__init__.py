"""The outer side: the OpenAI-compatible gateway, its request table and the frame decoder.

text      tokens -> text as it can be shown (UTF-8 and stop sequences held back)
link      the `Uplink` the service talks to (the real transport; `uplimit.both` pairs it in-process)
service   request table, stream ids and seeds, decoded frames -> per-choice events
app       the HTTP layer (FastAPI): OpenAI's request and response shapes, errors mapped once
"""
