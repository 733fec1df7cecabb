"""A real Ray head (`ray start --head`) shared by the tests that join or submit to a cluster.

Everything it runs listens on 127.0.0.1 only (Ray's local-only mode); it uses token
authentication with a token of its own (never ~/.ray/auth_token), and it is ended by session id
at the end (see helpers.py).
"""

import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import cli_env, end_session, free_port

from cluster.local_cluster import start_in_new_session


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    # Short: Ray's unix sockets live under it (108-byte path limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    token = tmp_path_factory.mktemp("ray_auth") / "token"
    token.write_text(secrets.token_hex(32))
    env = cli_env(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # local-only mode: every server on 127.0.0.1
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
    )
    gcs_port, dashboard_port = free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    session_id, returncode, output = start_in_new_session(command, env)
    if returncode != 0:
        end_session(session_id)
        pytest.fail(f"ray start failed:\n{output}")
    yield SimpleNamespace(
        gcs_address=f"127.0.0.1:{gcs_port}",
        jobs_address=f"http://127.0.0.1:{dashboard_port}",
        env=env,
        session_id=session_id,
    )
    end_session(session_id)
    shutil.rmtree(temp_dir, ignore_errors=True)
