"""The outbound side: an app's call to WeChat, routed, given its credential,
forwarded and replayed once (forward.py); a platform app's calls
(platform_calls.py); the answers the sidecar makes itself (replies.py,
jssdk_request.py)."""
