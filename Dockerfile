# CUDA PyTorch runtime with regnet installed; trains the default configuration unless told otherwise.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /regnet

COPY pyproject.toml README.md ./
COPY regnet ./regnet
RUN pip install -e . && python -c "import regnet, monai, lightning, hydra"

COPY configs ./configs
COPY scripts ./scripts
COPY train.py predict.py register.py evaluate.py ./

CMD ["python", "train.py"]
