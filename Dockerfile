# claude-proxy in a container: the pinned claude CLI, Python, the proxy and its modules/.
#   docker build -t claude-proxy .
# See docker-compose.yml for credentials and keys.
ARG CLAUDE_CODE_VERSION=2.1.330

FROM node:22-bookworm-slim AS cli
ARG CLAUDE_CODE_VERSION
# The package ships a native binary; node is needed only to install it.
RUN npm install -g --no-audit --no-fund "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
 && cp "$(readlink -f "$(npm root -g)/@anthropic-ai/claude-code/bin/claude.exe")" /claude \
 && /claude --version

FROM python:3.12-slim-bookworm
COPY --from=cli /claude /usr/local/bin/claude
# HOME is writable by any uid: compose runs the container as the host user's uid (UID/GID in
# .env), so that the mounted ~/.claude is readable whoever owns it on the host.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin claude \
 && install -d -o claude -g claude -m 0700 /home/claude/.claude \
 && chmod 1777 /home/claude
WORKDIR /app
COPY claude_openai_proxy.py LICENSE README.md ./
COPY modules ./modules
USER claude
ENV HOME=/home/claude \
    CLAUDE_CONFIG_DIR=/home/claude/.claude \
    CLAUDE_PROXY_HOST=0.0.0.0 \
    CLAUDE_PROXY_PORT=8088 \
    PYTHONUNBUFFERED=1
EXPOSE 8088
# the port the proxy listens on (CLAUDE_PROXY_PORT), not the one it was built with; 200 for
# "degraded" too: a restart fixes neither a login nor a missing CLI (README, Dashboard)
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('CLAUDE_PROXY_PORT', '8088'), timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python3", "/app/claude_openai_proxy.py"]
