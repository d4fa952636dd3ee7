"""The container files (issue 22): docker-compose.yml runs as the host user's uid (UID/GID in
.env) with an init as PID 1, the image's HEALTHCHECK follows CLAUDE_PROXY_PORT, and
.dockerignore keeps the repository's bulk and any local env file out of the build context.

`docker compose config` (or Debian's docker-compose) needs no daemon; building the image needs
its base images, which cannot be fetched here: that test skips and says so.
"""
import fnmatch
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def compose_command():
    """`docker compose` when the plugin is there, else docker-compose, else None."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(folder, dotenv=None):
    cmd = compose_command()
    if cmd is None:
        message = ("neither `docker compose` nor docker-compose is installed "
                   "(apt-get install docker-compose; .ci/run installs it)")
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    shutil.copy(ROOT / "docker-compose.yml", folder)
    (folder / "claude-proxy.env").write_text("CLAUDE_PROXY_API_KEYS=k\n")
    if dotenv is not None:
        (folder / ".env").write_text(dotenv)
    env = {k: v for k, v in os.environ.items()
           if k not in ("UID", "GID", "CLAUDE_PROXY_PORT") and not k.startswith("COMPOSE_")}
    env["HOME"] = str(folder)
    out = subprocess.run(cmd + ["config"], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_compose_runs_as_the_uid_in_dotenv_with_an_init(tmp_path):
    text = compose_config(tmp_path, "UID=1234\nGID=4321\nCLAUDE_PROXY_PORT=9123\n")
    assert re.search(r"^\s+user: '?1234:4321'?$", text, re.M), text
    assert re.search(r"^\s+init: true$", text, re.M), text
    assert "127.0.0.1:9123:9123" in text
    assert re.search(r"^\s+CLAUDE_PROXY_PORT: '9123'$", text, re.M), text
    assert "%s/.claude:/home/claude/.claude:rw" % tmp_path in text
    # the state store and the instance name outlive a recreated container
    assert "%s/.local/state/claude-proxy:/home/claude/.local/state/claude-proxy:rw" % tmp_path \
        in text, text
    assert re.search(r"^\s+CLAUDE_PROXY_STATE_DIR: /home/claude/.local/state/claude-proxy$",
                     text, re.M), text
    instance = re.search(r"^\s+CLAUDE_PROXY_INSTANCE: (\S+)$", text, re.M)
    assert instance and instance.group(1) == "claudeproxy", text
    sys.path.insert(0, str(ROOT))
    import claude_openai_proxy as proxy          # the name passes the proxy's own check
    assert proxy.load_config(["--instance", instance.group(1)],
                             environ={"HOME": str(tmp_path)})[0].instance == "claudeproxy"


def test_compose_without_dotenv_is_uid_1000_on_8088(tmp_path):
    text = compose_config(tmp_path)
    assert re.search(r"^\s+user: '?1000:1000'?$", text, re.M), text
    assert "127.0.0.1:8088:8088" in text


# -- the image's HEALTHCHECK -------------------------------------------------------------------

def healthcheck_argv():
    m = re.search(r"^HEALTHCHECK [^\n]*\\\n\s+CMD (\[.*\])$", DOCKERFILE, re.M)
    assert m, "no HEALTHCHECK ... CMD [...] in the Dockerfile"
    argv = json.loads(m.group(1))
    assert argv[0] == "python3"
    return [sys.executable] + argv[1:]


def test_healthcheck_follows_claude_proxy_port(make_proxy):
    p = make_proxy(fake=True, CLAUDE_PROXY_POOL_SIZE=0)
    env = dict(os.environ, CLAUDE_PROXY_PORT=str(p.port))
    assert subprocess.run(healthcheck_argv(), env=env, timeout=30).returncode == 0
    with socket.socket() as s:        # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        env["CLAUDE_PROXY_PORT"] = str(s.getsockname()[1])
    assert subprocess.run(healthcheck_argv(), env=env, capture_output=True,
                          timeout=30).returncode != 0


# -- .dockerignore -----------------------------------------------------------------------------

def ignored(path, patterns):
    """Docker's rule, enough for our patterns: a path is out when a pattern matches it or one
    of the folders it is in (`**/` at any depth)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                    pattern.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1],
                                                                       pattern[3:])):
                return True
    return False


def test_dockerignore_keeps_secrets_and_bulk_out_and_the_image_files_in():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [l.strip() for l in lines if l.strip() and not l.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "no exceptions needed"
    for path in (".git/config", "tests/conftest.py", "tests/fake_claude.py", ".cli/node_modules/x",
                 ".venv/bin/python", "bench/run.py", ".ci/run", "claude-proxy.env", ".env",
                 "prod.env", "claude-proxy.env.local", ".codex-cli/x", ".ai-sdk/x",
                 "modules/__pycache__/x.pyc", "claude-proxy.db"):
        assert ignored(path, patterns), path
    copied = [w for line in re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE, re.M)
              for w in line.split()[:-1]]
    assert copied == ["claude_openai_proxy.py", "LICENSE", "README.md", "modules"], copied
    for name in copied:
        for path in ([name] if (ROOT / name).is_file() else
                     [str(f.relative_to(ROOT)) for f in (ROOT / name).rglob("*.py")]):
            assert not ignored(path, patterns), path


# -- building the image (needs its base images) ------------------------------------------------

@pytest.mark.skip_in_ci_allowed
def test_image_builds_and_its_healthcheck_passes(tmp_path):
    podman = shutil.which("podman")
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    if podman is None:
        pytest.skip("podman is not installed; building also needs the base images %s, which "
                    "cannot be fetched on this machine (no registry but PyPI, Debian and npm)"
                    % ", ".join(bases))
    missing = [b for b in bases if subprocess.run([podman, "image", "exists", b]).returncode]
    if missing:
        pytest.skip("the base images %s are not present and cannot be fetched on this machine "
                    "(no container registry); load them with `podman load` to run this test"
                    % ", ".join(missing))
    tag = "claude-proxy-test:%d" % os.getpid()
    build = subprocess.run([podman, "build", "--format", "docker", "-t", tag, str(ROOT)],
                           capture_output=True, text=True, timeout=1800)
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        inspect = json.loads(subprocess.run([podman, "image", "inspect", tag], capture_output=True,
                                            text=True, check=True).stdout)
        test = inspect[0]["Config"]["Healthcheck"]["Test"]
        assert "CLAUDE_PROXY_PORT" in " ".join(test)
    finally:
        subprocess.run([podman, "rmi", "-f", tag], capture_output=True)
