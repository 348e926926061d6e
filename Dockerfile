# clinfer image: the job driver and gateway (default base), or a Ray node with
# clinfer installed (BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu RUN_USER=ray), so
# that Ray workers can import clinfer's stages. Both bases have Python 3.11, which
# Ray requires to match between the driver and the cluster.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG RUN_USER=clinfer
USER root
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/clinfer
COPY pyproject.toml README.md ./
COPY clinfer ./clinfer
COPY export ./export
COPY client ./client
COPY workers ./workers
COPY bench ./bench
# The CPU build of torch 2.13.0 (used by `clinfer export`); inference runs in Triton.
RUN python -m pip install --extra-index-url https://download.pytorch.org/whl/cpu . \
    && (id -u "${RUN_USER}" >/dev/null 2>&1 || useradd --create-home "${RUN_USER}")

USER ${RUN_USER}
WORKDIR /home/${RUN_USER}
CMD ["clinfer", "--help"]
