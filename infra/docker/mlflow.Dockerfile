# syntax=docker/dockerfile:1
# The MLflow tracking server of infra/k8s/mlflow.yaml: the same MLflow as the mumic package (pinned in
# pyproject.toml), plus the PostgreSQL driver and boto3 for the S3 artifact store.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t registry.example.com/mlplatform/mlflow:3.17.2 infra/docker
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.13 \
 && useradd --uid 1000 --gid 100 --create-home mlflow

USER 1000:100
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
