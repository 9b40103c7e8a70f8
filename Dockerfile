# megatron_red on an NGC PyTorch image: Python 3.12, CUDA, Transformer Engine and NVIDIA apex are inside.
FROM nvcr.io/nvidia/pytorch:25.09-py3

WORKDIR /opt/megatron_red
COPY . .
# Pin what the image ships (torch, Transformer Engine, apex) so pip never replaces them, then install the package
# with the GPU extras. vLLM (the `vllm` extra, rollout.engine=vllm) pins its own torch (2.13.0): install it in an
# image whose torch is that one, not over this image's.
RUN pip list --format=freeze | grep -iE '^(torch|transformer[-_]engine[-_a-z0-9]*|apex|triton)==' > /tmp/image-pins.txt \
    && pip install --no-cache-dir --constraint /tmp/image-pins.txt -e ".[gpu]" \
    && megatron-red --help > /dev/null

ENTRYPOINT ["megatron-red"]
