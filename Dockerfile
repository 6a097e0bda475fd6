# imagine for a GPU host: docker build -t imagine . && docker run --gpus all ... (see README).
# The base image brings CUDA, cuDNN and a CUDA build of PyTorch; pip keeps that torch because
# it satisfies the project's range.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

# Set to 1 to download the default models while building, so the first job starts at once.
ARG PRELOAD_MODELS=0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    IMAGINE_DATA_DIR=/data \
    IMAGINE_MODELS_DIR=/data/models \
    IMAGINE_DEVICE=auto

RUN useradd --create-home --uid 1000 imagine \
    && mkdir -p /data/models \
    && chown -R imagine:imagine /data

WORKDIR /app
COPY --chown=imagine:imagine pyproject.toml README.md ./
COPY --chown=imagine:imagine bot ./bot
COPY --chown=imagine:imagine generator ./generator
COPY --chown=imagine:imagine migrations ./migrations
RUN pip install --no-cache-dir -e .

USER 1000:1000
# A named volume is filled from the image on first use, so preloaded weights carry over to it;
# a bind mount over /data hides them and they are downloaded again on first run.
RUN if [ "$PRELOAD_MODELS" = "1" ]; then python -m generator download; fi
VOLUME ["/data"]

# DISCORD_TOKEN comes only from the environment at run time (`-e` or `--env-file`).
CMD ["python", "-m", "bot"]
