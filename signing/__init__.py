"""Config signing keys and signatures, the agents' certificate authority, enrollment tokens.

`signing.config_signing` and `signing.ca` are pure (no Django): the agent client imports the
first to verify what the server signs.
"""
