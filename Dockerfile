# One image for the API and the workers. `pip install .` takes torch from the package index:
# on x86_64 Linux that is the CUDA build, which the GPU worker needs (the API imports it only for
# training.implementation 'transformers', whose estimates trace the model: the [hf] extra).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md* ./
COPY planner ./planner
COPY service ./service
RUN pip install ".[hf]" && useradd --create-home --uid 10001 memplan

USER memplan
EXPOSE 8000
# API only; workers run `memplan worker` (see docker-compose.yml).
CMD ["memplan", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000"]
