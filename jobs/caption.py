"""Caption: recommendation-focused captions, a VLM through vLLM on GPU or tags written up by the small LLM on CPU.
Runs ingest (and the images stage, for captions) first if needed.

Local (items need image URLs or paths, e.g. an Amazon 2023 dump):
    python -m jobs.caption --output runs/tools ingest.source=amazon-2023 ingest.path=/data/amazon ingest.name=Tools
On a Ray cluster (GPU: CLIP vectors, a Qwen2.5-VL class captioner):
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.caption --output s3://bucket/runs/tools images.encoder=clip \
        images.model=openai/clip-vit-base-patch32 images.gpus_per_actor=1 \
        caption.mode=vlm caption.vlm.model=Qwen/Qwen2.5-VL-7B-Instruct
"""

import sys

from jobs._cli import main

if __name__ == "__main__":
    sys.exit(main("caption"))
