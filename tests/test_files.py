"""Hostile files (issue: FIFOs, devices, directories, huge files, YAML alias
bombs): `check` and `run` refuse them with exit 2 naming the file, never hang
or fill memory; at run time such a file refuses the reload and the sidecar
keeps serving."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import ROOT, SECRET, free_port, sidecar_yaml, wait_until


def check(config_path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(config_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def config_with_secret_file(tmp_path, secret_path) -> os.PathLike:
    text = sidecar_yaml("http://127.0.0.1:9", secret="PLACEHOLDER").replace(
        'secret: "PLACEHOLDER"', f"secret_file: {secret_path}")
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("kind, why", [
    ("fifo", "is a FIFO"), ("dev_zero", "is a device"), ("directory", "is a directory"),
    ("huge", "is 65537 bytes, over the 65536-byte limit"),
])
def test_check_refuses_a_secret_file_that_is_not_a_small_regular_file(tmp_path, kind, why):
    target = tmp_path / "secret"
    if kind == "fifo":
        os.mkfifo(target)                           # nobody writes: open() or read() would wait for ever
    elif kind == "dev_zero":
        target.symlink_to("/dev/zero")              # endless: read() would fill memory
    elif kind == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"x" * (64 * 1024 + 1))
    started = time.monotonic()
    result = check(config_with_secret_file(tmp_path, target))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"apps[0].secret_file: {target} {why}" in result.stderr
    assert time.monotonic() - started < 15 and "Traceback" not in result.stderr


def test_check_refuses_a_config_that_is_a_fifo(tmp_path):
    path = tmp_path / "config.yaml"
    os.mkfifo(path)
    result = check(path)
    assert result.returncode == 2 and f"{path}: is a FIFO" in result.stderr


def alias_bomb(levels: int = 9, fan: int = 10) -> str:
    text = 'a0: &a0 ["lol"]\n'
    for level in range(1, levels + 1):
        text += f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * fan) + "]\n"
    return text


def test_check_refuses_a_yaml_alias_bomb_at_once(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(alias_bomb() + sidecar_yaml("http://127.0.0.1:9"))
    assert len(path.read_bytes()) < 2000
    started = time.monotonic()
    result = check(path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "YAML aliases expand to more than" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 10


def test_anchors_and_merges_of_a_real_config_still_work(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent("""\
        listen: {host: 127.0.0.1, port: 0}
        apps:
          - &base {name: mp, appid: wx00000000000000b0, secret: s, token_api: stable, refresh_before_s: 200}
          - <<: *base
            name: mini
            appid: wx00000000000000b1
        """))
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert "mini" in result.stdout


async def test_a_secret_file_swapped_for_a_fifo_at_run_time_refuses_the_reload_and_serving_goes_on(
        sim, spawn, http, tmp_path):
    port, admin = free_port(), free_port()
    base, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"
    secret_file = tmp_path / "appsecret"
    secret_file.write_text(SECRET + "\n")
    text = sidecar_yaml(sim.url, listen_port=port, admin_port=admin, top="reload_poll_s: 0.2",
                        secret="PLACEHOLDER").replace('secret: "PLACEHOLDER"', f"secret_file: {secret_file}")
    proc = spawn(text)
    await proc.wait_ready(admin_url, timeout=10)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.replace(fifo, secret_file)                   # the mounted file is now a FIFO nobody writes
    await wait_until(lambda: "config reload refused" in proc.output(), timeout=10)
    for _ in range(5):                              # the event loop was never blocked
        async with http.get(f"{admin_url}/healthz", timeout=2) as resp:
            assert resp.status == 200
        async with http.get(f"{base}/cgi-bin/user/info", timeout=2) as resp:
            assert resp.status == 200
        await asyncio.sleep(0.1)
    assert f"{secret_file} is a FIFO" in proc.output()
    os.unlink(secret_file)
    secret_file.write_text(SECRET + "\n")           # fixed: the next reload is taken
    await wait_until(lambda: proc.output().count("config reloaded") >= 1, timeout=10)
    async with http.get(f"{base}/cgi-bin/user/info") as resp:
        assert resp.status == 200
