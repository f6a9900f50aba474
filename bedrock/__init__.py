"""The ground floor every pyemperor process stands on: the event loop, the
config dialect and its typed option table, the emperor pipe protocol,
logging, identities, sockets and process helpers. It imports nothing of
ours above it (tests/unit/test_layers.py)."""
