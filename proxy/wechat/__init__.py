"""WeChat's own algorithms, pure (no I/O, no config): message crypto and
signatures (crypto.py), the JS-SDK signature (jssdk.py). Shared by the
sidecar and the simulator."""
