"""Operations: the admin port's routes (admin.py), Prometheus metrics
(metrics.py), structured and access logs (logs.py)."""
