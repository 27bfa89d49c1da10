# wechat-token-sidecar: a small image, non-root, no build tools in the final stage.
# Pin the base by digest in your registry mirror for reproducible builds.

# ---- build: wheels for the package and its dependencies
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[fast]"

# ---- run
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_CONFIG=/etc/wechat-token-sidecar/config.yaml
COPY --from=build /wheels /wheels
# --no-index: only the wheels built above, so the version is the one just built.
RUN pip install --no-cache-dir --no-index --find-links=/wheels "wechat-token-sidecar[fast]==0.1.0" \
    && rm -rf /wheels
COPY config.yaml /etc/wechat-token-sidecar/config.yaml
# A numeric user so Kubernetes can verify runAsNonRoot.
USER 65532:65532
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["python", "-m", "proxy"]
CMD ["run"]
