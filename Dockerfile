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
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin claude \
 && install -d -o claude -g claude -m 0700 /home/claude/.claude
WORKDIR /app
COPY claude_openai_proxy.py LICENSE README.md ./
COPY modules ./modules
USER claude
ENV HOME=/home/claude \
    CLAUDE_PROXY_HOST=0.0.0.0 \
    CLAUDE_PROXY_PORT=8088 \
    PYTHONUNBUFFERED=1
EXPOSE 8088
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8088/health', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python3", "/app/claude_openai_proxy.py"]
