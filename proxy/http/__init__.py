"""Our two HTTP/1.1 halves: the proxy port's server (server.py, on
httptools) and the pooled upstream client (client.py). They know bytes and
framing, never tokens."""
