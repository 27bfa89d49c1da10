"""The inbound side: pushes from WeChat, verified and decrypted before
anything acts on them (component_push.py: a platform's verify tickets and
authorization events)."""
