# syntax=docker/dockerfile:1
# The MLflow tracking server (k8s/base/mlflow.yaml): the project's pinned MLflow plus the
# PostgreSQL driver (backend store) and boto3 (S3-compatible artifact store). Non-root.
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/regmix-mlflow:3.17.2 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp

COPY constraints.txt /opt/constraints.txt
RUN python3 -m venv /opt/venv \
 && pip install -c /opt/constraints.txt mlflow psycopg2-binary==2.9.13 boto3==1.44.5 \
 && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin mlflow

USER 1000:1000
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
