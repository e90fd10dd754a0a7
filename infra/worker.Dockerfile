# The GPU worker image: this repository installed with the one resolve (constraints.txt: torch 2.13.0 exactly;
# on Linux that wheel is the CUDA build and brings its own CUDA libraries, the host needs only the NVIDIA driver
# and container toolkit), and a Prefect process worker that runs the flows in /opt/umo.
#   docker build -f infra/worker.Dockerfile -t umo-worker .
FROM python:3.11-slim-bookworm

RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
    UMO_PROJECT_DIR=/opt/umo
WORKDIR /opt/umo

# Dependencies first (a layer that changes only with pyproject.toml / constraints.txt), then the code.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir umo && touch umo/__init__.py \
    && pip install --no-cache-dir -c constraints.txt -e . \
    && python -c 'import torch; assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__'
COPY . .
# dvc needs a git repository (dvc exp, lineage in dvc.lock): a build context without .git gets a fresh one.
RUN [ -d .git ] || { git init -q && git add -A \
    && git -c user.name=umo -c user.email=umo@localhost commit -qm "worker image"; }

CMD ["prefect", "worker", "start", "--pool", "umo-process", "--type", "process"]
