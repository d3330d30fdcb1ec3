# The pattern for a worker that needs a language runtime: build FROM turnd's image, install the
# runtime as root, copy the worker, go back to the turnd user, and point worker.command at it.
# With worker.sandbox = "landlock" the runtime's directories must be readable: list them in
# worker.sandbox_read. Build: docker build -f deploy/container/python-worker.Dockerfile .
ARG TURND_IMAGE=turnd:0.1.0
FROM ${TURND_IMAGE}
USER 0:0
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.* \
 && rm -rf /var/lib/apt/lists/*
COPY --chown=root:root deploy/container/worker.py /opt/agent/worker.py
USER 10001:10001
ENV TURND_WORKER__COMMAND='["/usr/bin/python3", "/opt/agent/worker.py"]' \
    TURND_WORKER__SANDBOX_READ='["/usr/lib/python3.11", "/usr/lib/python3", "/opt/agent"]'
