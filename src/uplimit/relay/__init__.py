"""The relay tier between the inner and the outer (docs/tiers.md): `uplimit serve relay`.

It uses wire/, link/, models/, coding/ and the outer's gateway, never inner/ (which holds the
strong model); neither side imports it (tests/unit/test_import_contracts.py).
"""
