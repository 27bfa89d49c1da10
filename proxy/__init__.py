"""wechat-token-sidecar: a sidecar reverse proxy that owns a WeChat access_token."""
__version__ = "0.1.0"
