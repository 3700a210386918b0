# One image for the migrate step, the API and the workers; it installs the wheel, as users do.
# TORCH_SPEC picks the torch build: the default CUDA wheel for GPU workers; pass
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only image.
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY alphawatch ./alphawatch
COPY service ./service
COPY workers ./workers
COPY dashboard ./dashboard
COPY alembic ./alembic
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim

ARG TORCH_SPEC="torch>=2.4"
ARG TORCH_INDEX=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi
COPY --from=wheel /dist /dist
RUN pip install /dist/alphawatch-*.whl && rm -rf /dist \
    && useradd --system --uid 10001 alphawatch
USER alphawatch
WORKDIR /home/alphawatch

EXPOSE 8000
CMD ["alphawatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
